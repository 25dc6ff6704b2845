"""Attribution graphs on real tiny transformers (GPT-2 and Llama configs) with random transcoders.

Every claim is held to an independent computation: edges to finite differences of the frozen replacement model,
direct logit edges to a closed form written here, influence/pruning/scores to brute force (matrix powers,
numpy), verification to ablations done by this file's own hooks, the JSON export to its importer.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from saescope.precompute.circuits.export import graph_to_json, load_graph_json
from saescope.precompute.circuits.graph import GraphLimitError, build_graph
from saescope.precompute.circuits.prune import graph_scores, influence, normalize, prune
from saescope.precompute.circuits.replacement import ReplacementModel
from saescope.precompute.circuits.transcoders import load_transcoders
from saescope.precompute.circuits.verify import verify
from saescope.precompute.config import CIRCUIT
from saescope.precompute.errors import UserError
from saescope.precompute.models import HookedLM
from saescope.precompute.saes import SAEConfig, load_sae, save_saelens
from saescope.precompute.saes.transcoder import JumpReLUTranscoder, SkipTranscoder, Transcoder

F = 16  # features per layer
IDS = [0, 17, 33, 2, 99, 100, 7, 250]
CFG = replace(CIRCUIT, max_feature_nodes=4096, batch_size=32)


@pytest.fixture(scope="module")
def lms(tiny_family_dir):
    from transformers import AutoModelForCausalLM

    out = {}
    for fam in ("gpt2", "llama"):
        m = AutoModelForCausalLM.from_pretrained(tiny_family_dir(fam)).double().eval()
        out[fam] = HookedLM(m, None, fam, "cpu")
    return out


def _mlp(lm, l):
    layer = lm.layers[l]
    return layer.mlp


def _mlp_io(lm, ids, sub=None):
    """Real-model MLP inputs and outputs per layer by this test's own hooks; sub: {layer: (pos, vec)} subtracted."""
    ins, outs, hs = {}, {}, []
    for l in range(lm.n_layers):
        mlp = _mlp(lm, l)
        hs.append(mlp.register_forward_pre_hook(lambda m, a, l=l: ins.__setitem__(l, a[0][0].detach().clone())))

        def post(m, a, o, l=l):
            if sub and l in sub:
                o = o.clone()
                o[0, sub[l][0]] -= sub[l][1]
            outs[l] = o[0].detach().clone()
            return o
        hs.append(mlp.register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0].double()
    finally:
        for h in hs:
            h.remove()
    return ins, outs, logits


def _write_saelens(tmp_path, lm, layers, seed=0, dec_scale=1.0):
    """Random SAELens transcoder folders: skip transcoder, JumpReLU, plain ReLU in turn."""
    g = torch.Generator().manual_seed(seed)
    d = lm.d_model
    folders = []
    for i, l in enumerate(layers):
        cls = (SkipTranscoder, JumpReLUTranscoder, Transcoder)[i % 3]
        cfg = SAEConfig(architecture=cls.architecture, d_in=d, d_sae=F, hook_name=f"blocks.{l}.hook_mlp_in",
                        hook_name_out=f"blocks.{l}.hook_mlp_out", apply_b_dec_to_input=False)
        sae = cls(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d, F, generator=g) * 2 / d ** 0.5)
            sae.b_enc.copy_(torch.randn(F, generator=g) * 0.3 - 1.0)
            sae.W_dec.copy_(torch.randn(F, d, generator=g) * 0.05 * dec_scale)
            sae.b_dec.copy_(torch.randn(d, generator=g) * 0.01)
            if cls is JumpReLUTranscoder:
                sae.threshold.copy_(torch.rand(F, generator=g) * 0.3)
            if cls is SkipTranscoder:
                sae.W_skip.copy_(torch.randn(d, d, generator=g) * 0.05)
        save_saelens(sae, tmp_path / f"tc{l}")
        folders.append(str(tmp_path / f"tc{l}"))
    return folders


def _write_clt(tmp_path, lm, seed=1):
    g = torch.Generator().manual_seed(seed)
    d, L = lm.d_model, lm.n_layers
    folder = tmp_path / "clt"
    folder.mkdir()
    for i in range(L):
        save_file({f"W_enc_{i}": torch.randn(F, d, generator=g) * 2 / d ** 0.5,
                   f"b_enc_{i}": torch.randn(F, generator=g) * 0.3 - 1.0,
                   f"b_dec_{i}": torch.randn(d, generator=g) * 0.01,
                   f"threshold_{i}": torch.rand(F, generator=g) * 0.2}, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": torch.randn(F, L - i, d, generator=g) * 0.05}, str(folder / f"W_dec_{i}.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder",
                                                        "feature_input_hook": "mlp.hook_in",
                                                        "feature_output_hook": "mlp.hook_out",
                                                        "activation": "jump_relu"}))
    return str(folder)


SETUPS = ["all", "some", "clt"]


@pytest.fixture(scope="module")
def tsets(lms, tmp_path_factory):
    out = {}
    for fam, lm in lms.items():
        root = tmp_path_factory.mktemp(f"tc_{fam}")
        out[(fam, "all")] = load_transcoders(_write_saelens(root, lm, [0, 1, 2]), lm.n_layers)
        out[(fam, "some")] = load_transcoders(_write_saelens(root / "some", lm, [0, 2], seed=3), lm.n_layers)
        out[(fam, "clt")] = load_transcoders(_write_clt(root, lm), lm.n_layers)
    return out


@pytest.fixture(scope="module")
def graphs(lms, tsets):
    return {key: build_graph(lms[key[0]], ts, IDS, cfg=CFG) for key, ts in tsets.items()}


def _target_value(rm, rep, g, row):
    n = g.node(row)
    if n["kind"] == "logit":
        return float(rep.h_final[-1] @ rm.demeaned_unembed(n["token"]))
    return float(rep.x_in[n["layer"]][n["pos"]] @ rm.tset.encoders[n["layer"]].W_enc[:, n["feature"]])


def _source_delta(rm, g, col):
    """What node `col` adds to the replacement model's inputs: the deltas of a replay that doubles it."""
    T, d = rm.T, rm.embed.shape[-1]
    n = g.node(col)
    if n["kind"] == "token":
        e = torch.zeros(T, d, dtype=rm.dtype)
        e[n["pos"]] = rm.embed[n["pos"]]
        return {"embed": e}
    if n["kind"] == "error":
        e = torch.zeros(T, d, dtype=rm.dtype)
        e[n["pos"]] = rm.error[n["layer"]][n["pos"]]
        return {n["layer"]: e}
    enc = rm.tset.encoders[n["layer"]]
    out = {}
    for o in enc.out_layers:
        e = torch.zeros(T, d, dtype=rm.dtype)
        e[n["pos"]] = n["activation"] * enc.W_dec[n["feature"], o - n["layer"]]
        out[o] = e
    return out


# ---------------------------------------------------------------- the replacement model
@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("setup", SETUPS)
def test_replacement_reproduces_model_logits(lms, tsets, fam, setup):
    lm = lms[fam]
    rm = ReplacementModel(lm, tsets[(fam, setup)], IDS)
    _, outs, logits = _mlp_io(lm, IDS)
    rep = rm.replay()
    np.testing.assert_allclose(rep.logits.detach().numpy(), logits.numpy(), rtol=0, atol=1e-5 * float(logits.abs().max()))
    # error nodes make it exact: reconstruction + error == the real MLP output, layer by layer
    for l in range(lm.n_layers):
        rec = rm.tset.reconstruction(rm.acts, rm.x_in, l)
        total = (rec if rec is not None else 0) + rm.error[l]
        # (Llama's RMSNorm computes in float32 inside a float64 model: agreement to float32 rounding)
        np.testing.assert_allclose(total[1:].numpy(), outs[l][1:].numpy(), rtol=1e-5, atol=1e-6 * float(outs[l].abs().max()))


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("setup", SETUPS)
def test_every_edge_is_a_finite_difference(lms, tsets, graphs, fam, setup):
    lm, g = lms[fam], graphs[(fam, setup)]
    rm = ReplacementModel(lm, tsets[(fam, setup)], IDS)
    assert g.n_features > 10 and len(g.logit_tokens) >= 1
    base = rm.replay()
    rows = list(range(g.n_features)) + list(range(g.logit_start, g.n_nodes))
    f0 = np.array([_target_value(rm, base, g, r) for r in rows])
    fd = np.zeros((len(rows), g.logit_start))
    with torch.no_grad():
        for col in range(g.logit_start):
            rep = rm.replay(_source_delta(rm, g, col))
            fd[:, col] = np.array([_target_value(rm, rep, g, r) for r in rows]) - f0  # exact: the map is linear
    A = g.adjacency[rows][:, : g.logit_start].numpy()
    scale = np.abs(A).max()
    assert scale > 0 and (A != 0).sum() > 50
    np.testing.assert_allclose(A, fd, rtol=1e-3, atol=1e-9 * scale)
    # a layer without a transcoder is all error node: no feature at that layer, and error/token rows are empty
    assert set(g.features[:, 0].tolist()) <= set(tsets[(fam, setup)].layers)
    assert not g.adjacency[g.error_start:g.logit_start].any()
    # BOS: no feature at position 0, its error nodes are zero
    assert (g.features[:, 1] > 0).all()
    for l in range(lm.n_layers):
        assert not g.adjacency[:, g.error_start + l * g.n_pos].any()


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("setup", SETUPS)
def test_batched_rows_equal_per_target_rows(lms, tsets, fam, setup):
    """The batched path (one backward pass vectorised over a batch of targets, rows read off by per-position
    products) gives the rows of one plain backward pass per target, for logit and feature targets of every layer in
    any order; and it stays one pass per batch."""
    from saescope.precompute.circuits.graph import Attributor

    rm = ReplacementModel(lms[fam], tsets[(fam, setup)], IDS)
    fast, ref = Attributor(rm), Attributor(rm, "per_target")
    feats = [("feature", j) for j in range(fast.n_active)]
    targets = [("logit", 5)] + feats[::-3] + [("logit", 99)] + feats[1::3]
    a, b = fast.rows(targets), ref.rows(targets)
    assert fast.n_backward == 1 and ref.n_backward == len(targets)
    assert len({int(fast.layer[j]) for _, j in targets[1:] if _ == "feature"}) > 1
    assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-5 * b.abs().max()
    with pytest.raises(ValueError, match="per_target"):
        Attributor(rm, "vmap")


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_direct_logit_edges_match_closed_form(lms, tsets, graphs, fam):
    """Features and errors of the last layer reach the logits only directly: edge = a d . s (c - mean c) (LayerNorm)
    or a d . s c (RMSNorm), c = (W_U[:, t] - mean W_U) * gain, s the final norm's scale at the last position."""
    lm, g, ts = lms[fam], graphs[(fam, "all")], tsets[(fam, "all")]
    L, T = lm.n_layers, len(IDS)
    ins, outs, _ = _mlp_io(lm, IDS)
    fin = {}
    from saescope.precompute.models import final_norm

    norm = final_norm(lm.model)
    h = norm.register_forward_pre_hook(lambda m, a: fin.__setitem__("x", a[0][0, -1].detach().clone()))
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([IDS]))
    h.remove()
    x = fin["x"]
    W_U = lm.model.get_output_embeddings().weight.detach().double().T.numpy()
    gain = norm.weight.detach().double().numpy()
    xn = x.numpy()
    if fam == "gpt2":
        s = 1 / np.sqrt(xn.var() + norm.eps)
    else:
        s = 1 / np.sqrt((xn ** 2).mean() + norm.variance_epsilon)
    # the last layer's transcoder, by numpy from its weights (independent of the graph code)
    enc = ts.encoders[L - 1]
    We, be, Wd = enc.W_enc.double().numpy(), enc.b_enc.double().numpy(), enc.W_dec[:, 0].double().numpy()
    pre = ins[L - 1].numpy() @ We + be
    acts = np.maximum(pre, 0) * (pre > enc.threshold.double().numpy() if enc.threshold is not None else 1)
    rec = acts @ Wd + ts.b_dec[L - 1].double().numpy()
    if L - 1 in ts.W_skip:
        rec = rec + ins[L - 1].numpy() @ ts.W_skip[L - 1].double().numpy().T
    err = outs[L - 1].numpy() - rec
    checked = 0
    for k, t in enumerate(g.logit_tokens):
        c = (W_U[:, t] - W_U.mean(1)) * gain
        J = s * (c - c.mean()) if fam == "gpt2" else s * c
        row = g.adjacency[g.logit_start + k]
        for f in np.nonzero(acts[T - 1])[0]:
            j = g.feature_index(L - 1, T - 1, int(f))
            np.testing.assert_allclose(float(row[j]), acts[T - 1, f] * Wd[f] @ J, rtol=1e-6)
            checked += 1
        np.testing.assert_allclose(float(row[g.error_start + (L - 1) * T + T - 1]), err[T - 1] @ J, rtol=1e-6)
        for j in range(g.n_features):  # last-layer features at earlier positions have no path to the logits
            if int(g.features[j, 0]) == L - 1 and int(g.features[j, 1]) < T - 1:
                assert float(row[j]) == 0.0
    assert checked > 0


# ---------------------------------------------------------------- influence, pruning, scores
def _bf_influence(A, w):
    An = np.abs(A)
    An = An / np.maximum(An.sum(1, keepdims=True), 1e-10)
    total, N = np.zeros(len(w)), len(w)
    for k in range(1, N + 1):
        term = w @ np.linalg.matrix_power(An, k)
        total += term
    assert not (w @ np.linalg.matrix_power(An, N + 1)).any()  # nilpotent: the series ends
    return total, An


def _bf_threshold(scores, frac):
    s = np.sort(scores.ravel())[::-1]
    cum = np.cumsum(s) / s.sum()
    return s[min(int(np.searchsorted(cum, frac)), len(s) - 1)]


def _bf_prune(g, nt, et):
    A, w = g.adjacency.numpy(), g.logit_weights().numpy()
    N, nf, fixed = len(w), g.n_features, g.n_pos + len(g.logit_tokens)
    infl, _ = _bf_influence(A, w)
    keep = infl >= _bf_threshold(infl, nt)
    keep[N - fixed:] = True
    P = A * keep[:, None] * keep[None, :]
    pinfl, Pn = _bf_influence(P, w)
    score = Pn * (pinfl + w)[:, None]
    edges = score >= _bf_threshold(score, et)
    changed = True
    while changed:
        edges = edges & keep[:, None] & keep[None, :]
        new = keep.copy()
        for i in range(N - fixed):
            if not edges[:, i].any():
                new[i] = False
        for i in range(nf):
            if not edges[i].any():
                new[i] = False
        changed = not np.array_equal(new, keep)
        keep = new
    edges = edges & keep[:, None] & keep[None, :]
    return keep, edges, infl


@pytest.mark.parametrize("key", [("gpt2", "some"), ("llama", "clt"), ("llama", "all")])
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9)])
def test_influence_and_pruning_match_brute_force(graphs, key, thresholds):
    g = graphs[key]
    A, w = g.adjacency.numpy(), g.logit_weights().numpy()
    bf, An = _bf_influence(A, w)
    np.testing.assert_allclose(influence(normalize(g.adjacency), g.logit_weights()).numpy(), bf, rtol=1e-9, atol=1e-15)
    # (I - Â)^{-1} - I form of the same series
    np.testing.assert_allclose(w @ np.linalg.inv(np.eye(len(w)) - An) - w, bf, rtol=1e-8, atol=1e-14)
    p = prune(g, *thresholds)
    keep, edges, _ = _bf_prune(g, *thresholds)
    assert np.array_equal(p.node_mask.numpy(), keep)
    assert np.array_equal(p.edge_mask.numpy(), edges)
    assert keep.sum() < len(keep) and edges.sum() < (A != 0).sum()
    assert p.node_mask[g.token_start:].all()


@pytest.mark.parametrize("key", [("gpt2", "some"), ("llama", "clt"), ("gpt2", "all")])
def test_scores_match_formulas(graphs, key):
    g = graphs[key]
    A, w = g.adjacency.numpy(), g.logit_weights().numpy()
    infl, An = _bf_influence(A, w)
    err = slice(g.error_start, g.token_start)
    tok = infl[g.token_start:g.logit_start].sum()
    rep = tok / (tok + infl[err].sum())
    comp = ((1 - An[:, err].sum(1)) * (infl + w)).sum() / (infl + w).sum()
    r, c = graph_scores(g)
    assert 0 < r < 1 and 0 < c < 1
    np.testing.assert_allclose([r, c], [rep, comp], rtol=1e-10)
    # a graph whose error nodes carry nothing is fully explained by features
    g0 = replace(g, adjacency=g.adjacency.clone())
    g0.adjacency[:, err] = 0
    assert graph_scores(g0) == pytest.approx((1.0, 1.0), abs=1e-12)


def test_layers_without_transcoders_cost_replacement_score(graphs):
    """Fewer layers with transcoders: more of the influence flows through error nodes."""
    for fam in ("gpt2", "llama"):
        assert graph_scores(graphs[(fam, "some")])[0] < 1
        g = graphs[(fam, "some")]
        assert g.covered == [0, 2]


def test_feature_selection_by_influence(lms, tsets):
    """With fewer feature nodes allowed than active, the graph keeps the most influential ones."""
    lm, ts = lms["llama"], tsets[("llama", "all")]
    full = build_graph(lm, ts, IDS, cfg=CFG)
    small = build_graph(lm, ts, IDS, cfg=replace(CFG, max_feature_nodes=12, batch_size=4))
    assert small.n_features == 12 and small.n_active == full.n_active
    # each kept feature's row equals the full graph's row restricted to the kept columns
    sel = [full.feature_index(*map(int, f)) for f in small.features]
    cols = sel + list(range(full.error_start, full.logit_start))
    np.testing.assert_allclose(small.adjacency[:12, : small.logit_start].numpy(),
                               full.adjacency[sel][:, cols].numpy(), rtol=1e-9, atol=1e-14)
    # the first visited features are the top ones by logit-row influence
    infl = influence(normalize(full.adjacency), full.logit_weights())[: full.n_features]
    top_direct = full.adjacency[full.logit_start:, : full.n_features].abs().sum(0).argmax()
    assert int(top_direct) in sel and float(infl[sel].sum()) > 0


# ---------------------------------------------------------------- checked against the real model
@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("setup", ["all", "clt"])
def test_verification_equals_own_ablation(lms, tsets, graphs, fam, setup):
    lm, ts, g = lms[fam], tsets[(fam, setup)], graphs[(fam, setup)]
    p = prune(g)
    nodes, edges = verify(lm, ts, g, p, replace(CFG, verify_nodes=6, verify_edges=6))
    assert len(nodes) == 6 and len(edges) >= 3
    _, _, base = _mlp_io(lm, IDS)
    tok = g.logit_tokens[0]
    dm = lambda lg: float(lg[-1, tok] - lg[-1].mean())  # noqa: E731
    for nc in nodes:
        n = g.node(nc.node)
        if n["kind"] == "feature":
            enc = ts.encoders[n["layer"]]
            sub = {o: (n["pos"], n["activation"] * enc.W_dec[n["feature"], o - n["layer"]].double()) for o in enc.out_layers}
        else:
            sub = {n["layer"]: (n["pos"], g.errors[n["layer"], n["pos"]])}
        _, _, lg = _mlp_io(lm, IDS, sub)
        assert nc.true == pytest.approx(dm(lg) - dm(base), rel=1e-9, abs=1e-12)
    ins0, _, _ = _mlp_io(lm, IDS)
    for ec in edges:
        s, t = g.node(ec.source), g.node(ec.target)
        enc_s, enc_t = ts.encoders[s["layer"]], ts.encoders[t["layer"]]
        sub = {o: (s["pos"], s["activation"] * enc_s.W_dec[s["feature"], o - s["layer"]].double()) for o in enc_s.out_layers}
        ins1, _, _ = _mlp_io(lm, IDS, sub)

        def act(x):
            pre = float(x[t["pos"]] @ enc_t.W_enc[:, t["feature"]].double() + enc_t.b_enc[t["feature"]])
            thr = float(enc_t.threshold[t["feature"]]) if enc_t.threshold is not None else 0.0
            return pre if pre > max(thr, 0.0) else 0.0
        assert ec.true == pytest.approx(act(ins1[t["layer"]]) - act(ins0[t["layer"]]), rel=1e-9, abs=1e-12)
        assert ec.weight == float(g.adjacency[ec.target, ec.source])


def _linearised_ablation(rm, g, source, rows):
    """Ablate `source` in the replacement model while every other feature of the graph responds with slope 1 to
    its pre-activation change (layer by layer until nothing moves): the effect the graph's estimate predicts."""
    base = rm.replay()
    f0 = np.array([_target_value(rm, base, g, r) for r in rows])
    pre0 = np.array([_target_value(rm, base, g, j) for j in range(g.n_features)])
    removal = {k: -v for k, v in _source_delta(rm, g, source).items()}
    deltas = dict(removal)
    with torch.no_grad():
        for _ in range(rm.n_layers + 2):
            rep = rm.replay(deltas)
            dpre = np.array([_target_value(rm, rep, g, j) for j in range(g.n_features)]) - pre0
            deltas = {k: v.clone() for k, v in removal.items()}
            for j in range(g.n_features):
                if j == source or dpre[j] == 0:
                    continue
                for o, v in _source_delta(rm, g, j).items():  # a_j d_j -> scaled to dpre_j d_j
                    deltas[o] = deltas.get(o, 0) + v * (dpre[j] / g.node(j)["activation"])
        rep = rm.replay(deltas)
    return np.array([_target_value(rm, rep, g, r) for r in rows]) - f0


@pytest.mark.parametrize("key", [("llama", "all"), ("gpt2", "clt")])
def test_estimates_equal_linearised_replacement(lms, tsets, graphs, key):
    """The verification's estimate is the graph's total effect: the replacement model's response to an ablation
    when downstream features respond linearly (an independent computation by replays)."""
    from saescope.precompute.circuits.verify import total_effects

    lm, ts, g = lms[key[0]], tsets[key], graphs[key]
    rm = ReplacementModel(lm, ts, IDS)
    A = g.adjacency
    logit_row = g.logit_start
    checked = 0
    for s in torch.argsort(-A[logit_row, : g.n_features].abs())[:4].tolist():
        targets = [logit_row] + [t for t in range(g.n_features) if A[t, s] != 0][:3]
        lin = _linearised_ablation(rm, g, s, targets)
        for t, v in zip(targets, lin):
            est = -float(total_effects(g, A[t])[s])
            assert est == pytest.approx(v, rel=1e-6, abs=1e-9 * float(A.abs().max()))
            checked += 1
    assert checked >= 8


# ---------------------------------------------------------------- export and limits
@pytest.mark.parametrize("key", [("gpt2", "all"), ("llama", "clt")])
def test_json_export_round_trips(graphs, key):
    g = graphs[key]
    p = prune(g)
    data = graph_to_json(g, p, graph_scores(g), slug="t", clerp=lambda l, f: f"feature {l}/{f}")
    text = json.dumps(data)
    back = load_graph_json(text)
    assert json.dumps(back.to_json()) == text
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(lk["source"] in ids and lk["target"] in ids for lk in data["links"])
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"cross layer transcoder", "embedding", "logit"} <= kinds
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert len(data["links"]) == int(p.edge_mask.sum())
    # every exported link weight is the adjacency entry it names
    index = {}
    for i in p.node_mask.nonzero()[:, 0].tolist():
        n = g.node(i)
        nid = {"feature": lambda: f"{n['layer']}_{n.get('feature')}_{n['pos']}", "error": lambda: f"0_{n['layer']}_{n['pos']}",
               "token": lambda: f"E_{n.get('token')}_{n['pos']}", "logit": lambda: f"{g.n_layers + 1}_{n.get('token')}_{n['pos']}"}[n["kind"]]()
        index[nid + ("_error" if nid in index else "")] = i
    for lk in data["links"][:200]:
        assert lk["weight"] == float(g.adjacency[index[lk["target"]], index[lk["source"]]])
    assert back.scores == pytest.approx(graph_scores(g))
    with pytest.raises(UserError, match="links\\[0\\].source"):
        bad = json.loads(text)
        bad["links"][0]["source"] = "nope"
        load_graph_json(bad)


def test_limits_and_bad_targets(lms, tsets):
    lm, ts = lms["gpt2"], tsets[("gpt2", "all")]
    with pytest.raises(GraphLimitError, match="at most 4"):
        build_graph(lm, ts, IDS, cfg=replace(CFG, max_tokens=4))
    with pytest.raises(UserError, match="outside the vocabulary"):
        build_graph(lm, ts, IDS, target=10_000, cfg=CFG)
    g = build_graph(lm, ts, IDS, target=42, cfg=CFG)
    assert g.logit_tokens == [42]
    with pytest.raises(GraphLimitError, match="longer than"):
        build_graph(lm, ts, IDS, cfg=replace(CFG, max_seconds=0.0))


def test_non_transcoder_sae_is_refused(lms, tiny_sae_dir):
    with pytest.raises(UserError, match="not a transcoder"):
        load_transcoders([str(tiny_sae_dir)], 3)


# ---------------------------------------------------------------- formats
def test_transcoder_formats_load_and_encode(lms, tmp_path):
    """SAELens transcoder folders, circuit-tracer per-layer files and a CLT folder give the same numbers as numpy."""
    lm = lms["gpt2"]
    d = lm.d_model
    folders = _write_saelens(tmp_path, lm, [0, 1, 2])
    sk = load_sae(folders[0])
    assert sk.cfg.architecture == "skip_transcoder" and sk.cfg.hook_name_out == "blocks.0.hook_mlp_out"
    x = torch.randn(5, d, dtype=torch.float32)
    Wd = sk.W_dec.detach().numpy().astype(np.float64)
    z = np.maximum(x.double().numpy() @ sk.W_enc.detach().double().numpy() + sk.b_enc.detach().double().numpy(), 0)
    ref = z @ Wd + sk.b_dec.detach().double().numpy() + x.double().numpy() @ sk.W_skip.detach().double().numpy().T
    np.testing.assert_allclose(sk(x).detach().numpy(), ref, rtol=1e-4, atol=1e-5)
    # the same transcoders as a circuit-tracer transcoder set
    ct = tmp_path / "ct"
    ct.mkdir()
    for l, f in enumerate(folders):
        s = load_sae(f)
        st = {"W_enc": s.W_enc.detach().T.contiguous(), "W_dec": s.W_dec.detach(), "b_enc": s.b_enc.detach(),
              "b_dec": s.b_dec.detach()}
        if hasattr(s, "threshold"):
            st["activation_function.threshold"] = s.threshold.detach()
        if getattr(s, "has_skip", False):
            st["W_skip"] = s.W_skip.detach()
        save_file(st, str(ct / f"layer_{l}.safetensors"))
    (ct / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                                                    "feature_output_hook": "mlp.hook_out", "scan": "test"}))
    a, b = load_transcoders(folders, 3), load_transcoders(str(ct), 3)
    xin = {l: torch.randn(4, d) for l in range(3)}
    for l in range(3):
        ea, eb = a.encoders[l], b.encoders[l]
        np.testing.assert_allclose(ea.encode(xin[l]).numpy(), eb.encode(xin[l]).numpy(), rtol=1e-6, atol=1e-6)
        acts = {k: a.encoders[k].encode(xin[k]) for k in range(3)}
        np.testing.assert_allclose(a.reconstruction(acts, xin, l).numpy(), b.reconstruction(acts, xin, l).numpy(),
                                   rtol=1e-5, atol=1e-6)
    # a CLT: the reconstruction at layer l sums every earlier layer's decoder slice (numpy reference)
    clt = load_transcoders(_write_clt(tmp_path, lm), 3)
    assert clt.kind == "cross_layer_transcoder" and list(clt.encoders[0].out_layers) == [0, 1, 2]
    acts = {k: clt.encoders[k].encode(xin[k]) for k in range(3)}
    for l in range(3):
        ref = sum(acts[s].double().numpy() @ clt.encoders[s].W_dec[:, l - s].double().numpy() for s in range(l + 1))
        ref = ref + clt.b_dec[l].double().numpy()
        np.testing.assert_allclose(clt.reconstruction(acts, xin, l).double().numpy(), ref, rtol=1e-5, atol=1e-6)
    # one CLT layer as an SAE (for dashboards)
    sae = clt.layer_sae(1)
    assert sae.cfg.hook_name == "blocks.1.hook_mlp_in"
    np.testing.assert_allclose(sae.encode(xin[1]).detach().numpy(), acts[1].numpy(), rtol=1e-6, atol=1e-6)


def test_transcoder_encode_path_reads_mlp_input(lms, tmp_path):
    """Precompute's encode path (encode_batch) reads a transcoder's input hook: the MLP's input."""
    from saescope.precompute.encode import encode_activations

    lm = lms["llama"]
    sae = load_sae(_write_saelens(tmp_path, lm, [1])[0]).double()
    ins, _, _ = _mlp_io(lm, IDS)
    acts = lm.activations(torch.tensor([IDS]), "blocks.1.hook_mlp_in")
    np.testing.assert_allclose(acts[0].numpy(), ins[1].float().numpy(), rtol=1e-6)
    alias = lm.activations(torch.tensor([IDS]), "blocks.1.ln2.hook_normalized")
    assert torch.equal(acts, alias)
    z = encode_activations(sae, acts.double(), torch.zeros(1, len(IDS), dtype=torch.bool))
    ref = np.maximum(ins[1].numpy() @ sae.W_enc.detach().numpy() + sae.b_enc.detach().numpy(), 0)
    np.testing.assert_allclose(z[0].numpy(), ref, rtol=1e-5, atol=1e-6)


def test_transcoder_store_has_dashboards(tmp_path, tiny_lm_dir, small_corpus):
    """A transcoder precomputes like any SAE: its top examples are the MLP input's activations (own hook + numpy)."""
    from conftest import TINY_ARGS

    from saescope.precompute.data import special_mask
    from saescope.precompute.models import load_model
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute
    from saescope.precompute.store import Store

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    g = torch.Generator().manual_seed(4)
    d = lm.d_model
    sae = JumpReLUTranscoder(SAEConfig(architecture="jumprelu_transcoder", d_in=d, d_sae=24,
                                       hook_name="blocks.1.hook_mlp_in", hook_name_out="blocks.1.hook_mlp_out"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, 24, generator=g) * 2 / d ** 0.5)
        sae.b_enc.copy_(torch.randn(24, generator=g) * 0.3 - 0.5)
        sae.W_dec.copy_(torch.randn(24, d, generator=g) * 0.05)
        sae.threshold.copy_(torch.rand(24, generator=g) * 0.2)
    save_saelens(sae, tmp_path / "tc")
    out = tmp_path / "tc.duckdb"
    run_precompute(PrecomputeSpec(out=out, model=str(tiny_lm_dir), saes=[SAESpec(str(tmp_path / "tc"), sae_id="tc")],
                                  dataset=str(small_corpus), feature_map=False, **{**TINY_ARGS, "tokens": 64 * 8}))
    W, b, thr = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.threshold))
    with Store(out) as s:
        assert s.count_features("tc") == 24
        checked = 0
        for f in range(24):
            for e in s.examples("tc", f, "top")[:2]:
                ins, _, _ = _mlp_io(lm, list(e.token_ids))
                pre = ins[1].double().numpy() @ W[:, f] + b[f]
                ref = np.where(pre > thr[f], np.maximum(pre, 0), 0)
                ref[special_mask(np.asarray([e.token_ids]), lm.tokenizer)[0]] = 0  # BOS/EOS are never features
                np.testing.assert_allclose(np.asarray(e.acts), ref, rtol=1e-4, atol=1e-5)
                checked += 1
        assert checked > 10


CT_PYTHON = "/work/ct-venv/bin/python"


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists(CT_PYTHON), reason="circuit-tracer's venv (/work/ct-venv) absent")
def test_export_loads_in_circuit_tracer(graphs, tmp_path):
    """circuit-tracer 0.5.0's own graph-file model (frontend.graph_models.Model) reads the exported files."""
    import subprocess

    from saescope.precompute.circuits.export import write_graph_files

    for key in (("gpt2", "all"), ("llama", "clt")):
        g = graphs[key]
        write_graph_files(graph_to_json(g, prune(g), graph_scores(g), slug=f"{key[0]}-{key[1]}"), tmp_path)
    code = ("import json, sys, pathlib\nfrom circuit_tracer.frontend.graph_models import Model\n"
            "d = pathlib.Path(sys.argv[1])\nmeta = json.loads((d / 'graph-metadata.json').read_text())\n"
            "for g in meta['graphs']:\n    m = Model.model_validate(json.loads((d / (g['slug'] + '.json')).read_text()))\n"
            "    print(g['slug'], len(m.nodes), len(m.links))\n")
    out = subprocess.run([CT_PYTHON, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0].startswith("gpt2-all ") and lines[1].startswith("llama-clt ")


# ---------------------------------------------------------------- the worker's /graph
@pytest.fixture(scope="module")
def graph_worker(tiny_lm_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes import create_worker_app
    from saescope.precompute.models import load_model

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    root = tmp_path_factory.mktemp("worker_tc")
    folders = _write_saelens(root, lm, [0, 2], seed=9)
    engine = build_engine(str(tiny_lm_dir), {"tc0": folders[0], "tc2": folders[1]}, {}, "cpu", "float32")
    with TestClient(create_worker_app(engine)) as client:
        yield client, engine, folders


def test_worker_graph_route(graph_worker):
    from saescope.precompute.circuits.run import circuit

    client, engine, folders = graph_worker
    r = client.post("/graph", json={"text": "The cat sat on the", "verify": True})
    assert r.status_code == 200, r.text
    body = r.json()
    back = load_graph_json(body["graph"])
    assert back.to_json() == body["graph"]
    assert body["sae_ids"] == {"0": "tc0", "2": "tc2"}
    assert 0 < body["replacement_score"] < 1 and 0 < body["completeness_score"] <= 1
    assert body["node_checks"] and all(set(c) == {"node_id", "estimate", "true", "agree"} for c in body["node_checks"])
    ids = {n["node_id"] for n in body["graph"]["nodes"]}
    assert all(c["node_id"] in ids for c in body["node_checks"])
    # the same graph as precompute's own call on the same model and transcoders
    direct = circuit(engine.lm, load_transcoders(folders, engine.lm.n_layers), "The cat sat on the", check=False)
    assert {(lk["source"], lk["target"]) for lk in body["graph"]["links"]} == \
        {(lk["source"], lk["target"]) for lk in direct.to_json()["links"]}


def test_worker_graph_bad_input(graph_worker, tiny_lm_dir, tiny_sae_dir):
    from fastapi.testclient import TestClient

    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes import create_worker_app

    client, _, _ = graph_worker
    r = client.post("/graph", json={"text": "word " * 200})
    assert r.status_code == 413 and f"at most {CIRCUIT.max_tokens}" in r.json()["error"]["message"]
    r = client.post("/graph", json={"text": "The cat", "target": "two words"})
    assert r.status_code == 422 and "exactly one token" in r.json()["error"]["message"]
    r = client.post("/graph", json={"text": "The cat", "sae_ids": ["nope"]})
    assert r.status_code == 404 and "tc0" in r.json()["error"]["message"]
    r = client.post("/graph", json={"text": "The cat", "node_threshold": 2})
    assert r.status_code == 422
    # a worker without transcoders but with a residual-stream SAE builds a residual graph (test_circuits_residual.py
    # has the 422 for a worker with neither)
    plain = build_engine(str(tiny_lm_dir), {"tiny": str(tiny_sae_dir)}, {}, "cpu", "float32")
    with TestClient(create_worker_app(plain)) as c2:
        r = c2.post("/graph", json={"text": "The cat", "verify": False})
    assert r.status_code == 200 and "residual-stream SAEs" in r.json()["graph"]["metadata"]["saescope"]["method"]


# ---------------------------------------------------------------- the /graph page
@pytest.fixture(scope="module")
def graph_site(graph_worker, tiny_store):
    """The dashboard (on the tiny store) talking to a real uvicorn worker that has transcoders."""
    import threading
    import time

    import httpx
    import uvicorn
    from fastapi.testclient import TestClient

    from conftest import free_port
    from saescope.app.web.app import create_app
    from saescope.app.worker.routes import create_worker_app

    _, engine, _ = graph_worker
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_worker_app(engine), host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield TestClient(create_app(tiny_store, worker_url=url)), url
    server.should_exit = True
    th.join(timeout=10)


def test_graph_page_renders_the_workers_graph(graph_site):
    import re

    import httpx

    client, url = graph_site
    q = {"prompt": "The cat sat on the", "node": 0.8, "edge": 0.98}
    graph = httpx.post(url + "/graph", json={"text": q["prompt"]}, timeout=120).json()["graph"]
    first, second = graph["nodes"][0]["node_id"], graph["nodes"][1]["node_id"]
    r = client.get("/graph", params={**q, "pinned": f"{first},{second}", "selected": first})
    assert r.status_code == 200, r.text
    html = r.text
    ids = re.findall(r'<g class="node [^"]*" data-id="([^"]+)"', html)
    assert sorted(ids) == sorted(n["node_id"] for n in graph["nodes"])
    assert html.count('<line class="link') == len(graph["links"])
    assert re.search(rf'class="node [^"]*pinned[^"]*" data-id="{re.escape(first)}"', html)
    assert re.search(rf'class="node [^"]*selected[^"]*" data-id="{re.escape(first)}"', html)
    assert 'id="replacement-score"' in html and 'id="node-checks"' in html
    data = json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', html, re.S).group(1))
    assert len(data["links"]) == len(graph["links"])
    # the worker's transcoders have no dashboards in this store: their features are drawn, without card or link
    assert data["sae_ids"] == {} and any(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])


def test_graph_page_bad_input(graph_site):
    client, _ = graph_site
    r = client.get("/graph", params={"prompt": "word " * 200})
    assert r.status_code == 413 and f"at most {CIRCUIT.max_tokens}" in r.text
    r = client.get("/graph", params={"prompt": "The cat", "target": "two words"})
    assert r.status_code == 422 and "exactly one token" in r.text
    r = client.get("/graph", params={"prompt": "The cat", "node": 3})
    assert r.status_code == 422
    assert client.get("/graph").status_code == 200  # the empty form


@pytest.mark.slow
@pytest.mark.browser
def test_graph_page_in_chromium(graph_site, tiny_store, browser):
    """Chromium opens a graph, clicks a node (its card), pins two into a supernode, reloads: the same view."""
    import os
    import threading
    import time

    import httpx
    import uvicorn

    from conftest import ARTIFACTS, free_port
    from saescope.app.web.app import create_app

    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("no /usr/bin/chromium")

    _, wurl = graph_site
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_store, worker_url=wurl), host="127.0.0.1", port=port,
                                           log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(base + "/", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        if True:  # the session's Chromium (tests/conftest.py): a second sync Playwright would clash with it
            ctx = browser.new_context(viewport={"width": 1300, "height": 900})
            pg = ctx.new_page()
            pg.goto(base + "/graph?prompt=The+cat+sat+on+the", timeout=180_000)
            nodes = pg.locator("g.node.cross-layer-transcoder")
            assert nodes.count() >= 2
            a, c = nodes.nth(0).get_attribute("data-id"), nodes.nth(1).get_attribute("data-id")
            nodes.nth(0).click()
            pg.wait_for_selector("#node-card h2")
            assert a in pg.inner_text("#node-card") and "strongest" in pg.inner_text("#node-card")
            nodes.nth(0).click(modifiers=["Shift"])
            nodes.nth(1).click(modifiers=["Shift"])
            assert pg.locator("#pinned-list li").count() == 2
            pg.once("dialog", lambda d: d.accept("my supernode"))
            pg.click("#group-btn")
            assert "my supernode" in pg.inner_text("#group-list")
            url = pg.url
            assert "groups=" in url and "selected=" in url
            pg.goto(url, timeout=180_000)
            pg.wait_for_selector("#node-card h2")
            assert a in pg.inner_text("#node-card")
            assert f"my supernode: {a}, {c}" in pg.inner_text("#group-list")
            assert pg.locator(f'g.node.selected[data-id="{a}"]').count() == 1
            ARTIFACTS.mkdir(exist_ok=True)
            pg.screenshot(path=str(ARTIFACTS / "graph_page.png"), full_page=True)
            ctx.close()
    finally:
        server.should_exit = True
        th.join(timeout=10)


def test_circuit_tracer_files_load_as_saes(lms, tmp_path):
    """load_sae (what precompute uses) reads one layer of a circuit-tracer folder / file as a transcoder SAE."""
    lm = lms["gpt2"]
    clt_dir = _write_clt(tmp_path, lm)
    clt = load_transcoders(clt_dir, 3)
    sae = load_sae(clt_dir, "blocks.2.hook_mlp_in")
    assert sae.cfg.hook_name == "blocks.2.hook_mlp_in" and sae.cfg.hook_name_out == "blocks.2.hook_mlp_out"
    x = torch.randn(6, lm.d_model)
    np.testing.assert_allclose(sae.encode(x).detach().numpy(), clt.encoders[2].encode(x).numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="--hook"):
        load_sae(clt_dir)
    one = tmp_path / "ct" / "layer_1.safetensors"
    one.parent.mkdir()
    save_file({"W_enc": torch.randn(F, lm.d_model), "W_dec": torch.randn(F, lm.d_model), "b_enc": torch.randn(F),
               "b_dec": torch.zeros(lm.d_model)}, str(one))
    s1 = load_sae(str(one))
    assert s1.cfg.hook_name == "blocks.1.hook_mlp_in" and s1.cfg.architecture == "transcoder"


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_node_interventions_frozen_and_real(lms, tsets, graphs, fam):
    from saescope.precompute.circuits.intervene import FeatureEdit, intervene

    lm, ts, g = lms[fam], tsets[(fam, "clt")], graphs[(fam, "clt")]
    feats = [g.node(j) for j in range(g.n_features)]
    early = [f for f in feats if f["layer"] == 0][:2]
    edits = [FeatureEdit(f["layer"], f["pos"], f["feature"], "scale", 3.0) for f in early]
    out = intervene(lm, ts, IDS, edits)
    _, _, base = _mlp_io(lm, IDS)
    np.testing.assert_allclose(out["logits"]["base"].numpy(), base[-1].numpy(), rtol=1e-6, atol=1e-8)
    # real: the test's own hook adds (3a - a) d at every layer the CLT feature writes to
    sub = {}
    for f in early:
        enc = ts.encoders[f["layer"]]
        for o in enc.out_layers:
            v = -(2.0 * f["activation"]) * enc.W_dec[f["feature"], o - f["layer"]].double()
            p0, v0 = sub.get(o, (None, None))
            if p0 is not None and p0 != f["pos"]:
                pytest.skip("edits at two positions of one layer")  # the own hook takes one position per layer
            sub[o] = (f["pos"], v if v0 is None else v0 + v)
    _, _, real = _mlp_io(lm, IDS, sub)
    np.testing.assert_allclose(out["logits"]["real"].numpy(), real[-1].numpy(), rtol=1e-6, atol=1e-8)
    assert not np.allclose(out["logits"]["frozen"].numpy(), out["logits"]["real"].numpy())  # patterns matter
    # a no-op edit leaves both unchanged; an edit at the last layer and position cannot reach any attention: frozen == real
    noop = intervene(lm, ts, IDS, [FeatureEdit(*map(int, g.features[0]), "scale", 1.0)])
    np.testing.assert_allclose(noop["logits"]["frozen"].numpy(), base[-1].numpy(), rtol=1e-6, atol=1e-8)
    last = [f for f in feats if f["layer"] == 2 and f["pos"] == len(IDS) - 1][:1]
    if last:
        o2 = intervene(lm, ts, IDS, [FeatureEdit(2, last[0]["pos"], last[0]["feature"], "set", 5.0)])
        np.testing.assert_allclose(o2["logits"]["frozen"].numpy(), o2["logits"]["real"].numpy(), rtol=1e-6, atol=1e-8)
        assert not np.allclose(o2["logits"]["real"].numpy(), base[-1].numpy())
    with pytest.raises(UserError, match="no transcoder at layer 7"):
        intervene(lm, ts, IDS, [FeatureEdit(7, 1, 0)])


# ---------------------------------------------------------------- the worker's graph cache and /graph/intervene
def test_worker_graph_cache_rebuilds_nothing(graph_worker):
    """A reload and other thresholds reuse the unpruned graph: the build counter does not move, the graph is the same,
    and a re-pruning equals precompute's own pruning of a freshly built graph."""
    from saescope.precompute.circuits.run import circuit

    client, engine, folders = graph_worker
    cache = client.app.state.graph_cache
    q = {"text": "A dog ran to the", "verify": False}
    first = client.post("/graph", json=q).json()
    assert first["cached"] is False
    builds = cache.builds
    again = client.post("/graph", json=q).json()
    assert again["cached"] is True and cache.builds == builds
    assert again["graph"] == first["graph"] and again["graph_seconds"] == first["graph_seconds"]
    other = client.post("/graph", json={**q, "node_threshold": 0.5, "edge_threshold": 0.9}).json()
    assert other["cached"] is True and cache.builds == builds
    direct = circuit(engine.lm, load_transcoders(folders, engine.lm.n_layers), q["text"], node_threshold=0.5,
                     edge_threshold=0.9, check=False).to_json(node_threshold=0.5)
    assert {(lk["source"], lk["target"]) for lk in other["graph"]["links"]} == \
        {(lk["source"], lk["target"]) for lk in direct["links"]}
    assert len(other["graph"]["nodes"]) < len(first["graph"]["nodes"])
    # another target or max_feature_nodes is another graph
    assert client.post("/graph", json={**q, "max_feature_nodes": 7}).json()["cached"] is False
    assert cache.builds == builds + 1


def test_graph_cache_is_bounded():
    from saescope.app.worker.routes.graph import CachedGraph, GraphCache

    c = GraphCache(max_graphs=2, max_bytes=100)
    for k in "abc":
        c.put((k,), CachedGraph(None, 0.0, 10))
    assert c.keys() == [("b",), ("c",)]
    c.get(("b",))  # used: c is now the oldest
    c.put(("d",), CachedGraph(None, 0.0, 10))
    assert c.keys() == [("b",), ("d",)]
    c.put(("big",), CachedGraph(None, 0.0, 101))  # larger than the whole cache: not kept
    assert ("big",) not in c.keys()
    c.put(("e",), CachedGraph(None, 0.0, 95))  # bytes bound: the others go
    assert c.keys() == [("e",)]


def _own_intervention(engine, ids, edits):
    """The test's own intervention: clean MLP inputs by a pre-hook, each feature's activation by its SAE's encode,
    then (new - a) * W_dec[f] added to the MLP output at its position by a forward hook, nothing else changed."""
    lm = engine.lm
    ins, hs = {}, []
    for l in range(lm.n_layers):
        hs.append(lm.layers[l].mlp.register_forward_pre_hook(lambda m, a, l=l: ins.__setitem__(l, a[0][0].detach().clone())))
    with torch.no_grad():
        clean = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    for h in hs:
        h.remove()
    by_layer = {0: "tc0", 2: "tc2"}
    add, acts = {}, []
    for layer, pos, feat, mode, value in edits:
        sae = engine.saes[by_layer[layer]]
        with torch.no_grad():
            a = float(sae.encode(ins[layer])[pos, feat])
        new = a * value if mode == "scale" else value
        acts.append((a, new))
        d = add.setdefault(layer, torch.zeros_like(ins[layer]))
        d[pos] += (new - a) * sae.W_dec[feat].detach()
    hs = [lm.layers[l].mlp.register_forward_hook(lambda m, a, o, d=d: o + d[None]) for l, d in add.items()]
    with torch.no_grad():
        real = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    for h in hs:
        h.remove()
    return clean, real, acts


def test_worker_graph_intervene_equals_own_hooks(graph_worker):
    from saescope.precompute.circuits.graph import prompt_ids
    from saescope.precompute.circuits.intervene import FeatureEdit, intervene

    client, engine, folders = graph_worker
    text = "The cat sat on the"
    g = client.post("/graph", json={"text": text, "verify": False}).json()["graph"]
    feats = [tuple(int(x) for x in n["node_id"].split("_")) for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"]
    l0 = [f for f in feats if f[0] == 0][0]
    l2 = [f for f in feats if f[0] == 2][0]
    edits = [(l0[0], l0[2], l0[1], "scale", 3.0), (l2[0], l2[2], l2[1], "set", 0.5)]
    body = {"text": text, "k": 5, "edits": [{"layer": l, "pos": p, "feature": f, "mode": m, "value": v}
                                            for l, p, f, m, v in edits]}
    r = client.post("/graph/intervene", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = prompt_ids(engine.lm, text)
    clean, real, acts = _own_intervention(engine, ids, edits)
    for kind, logits in (("clean", clean), ("real", real)):
        p = torch.softmax(logits, -1)
        top = p.topk(5)
        assert [t["token_id"] for t in out[kind]] == top.indices.tolist()
        np.testing.assert_allclose([t["prob"] for t in out[kind]], top.values.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose([t["logit"] for t in out[kind]], logits[top.indices].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([(e["activation"], e["new_activation"]) for e in out["edits"]], acts, rtol=1e-5, atol=1e-6)
    assert [e["node_id"] for e in out["edits"]] == [f"{l}_{f}_{p}" for l, p, f, _, _ in edits]
    assert [t["token"] for t in out["clean"]] == [engine.lm.tokenizer.decode([t["token_id"]]) for t in out["clean"]]
    # frozen: the library's frozen-attention intervention, unchanged by the route
    ts = load_transcoders(folders, engine.lm.n_layers)
    lib = intervene(engine.lm, ts, ids, [FeatureEdit(l, p, f, m, v) for l, p, f, m, v in edits], k=5)
    assert [t["token_id"] for t in out["frozen"]] == [t for t, _ in lib["frozen"]]
    np.testing.assert_allclose([t["prob"] for t in out["frozen"]], [p for _, p in lib["frozen"]], rtol=1e-6)
    # an edit at the last layer and position reaches no attention: frozen equals real equals the own hook
    last = [f for f in feats if f[0] == 2 and f[2] == len(ids) - 1]
    if last:
        e1 = [(2, last[0][2], last[0][1], "scale", -2.0)]
        o1 = client.post("/graph/intervene", json={"text": text, "k": 3, "edits": [
            {"layer": 2, "pos": e1[0][1], "feature": e1[0][2], "mode": "scale", "value": -2.0}]}).json()
        _, real1, _ = _own_intervention(engine, ids, e1)
        np.testing.assert_allclose([t["prob"] for t in o1["frozen"]], [t["prob"] for t in o1["real"]], rtol=1e-4)
        np.testing.assert_allclose([t["prob"] for t in o1["real"]], torch.softmax(real1, -1).topk(3).values.numpy(),
                                   rtol=1e-4)


def test_worker_graph_intervene_limits(graph_worker):
    from saescope.precompute.config import LIMITS

    client, _, _ = graph_worker
    one = {"layer": 0, "pos": 1, "feature": 0, "mode": "scale", "value": 2.0}

    def err(body):
        r = client.post("/graph/intervene", json={"text": "The cat", **body})
        assert 400 <= r.status_code < 500, r.text
        return r.status_code, r.json()["error"]["message"]

    s, m = err({"edits": [one] * (LIMITS.max_edits + 1)})
    assert s == 422 and "edits" in m and str(LIMITS.max_edits) in m
    s, m = err({"edits": [{**one, "value": 2 * LIMITS.max_abs_value}]})
    assert s == 422 and "value" in m and f"{LIMITS.max_abs_value:g}" in m
    s, m = err({"edits": [one], "k": LIMITS.max_top_logits + 1})
    assert s == 422 and m.startswith("k ") and str(LIMITS.max_top_logits) in m
    s, m = err({"edits": [{**one, "layer": 1}]})
    assert s == 422 and "no transcoder at layer 1" in m and "0, 2" in m
    s, m = err({"edits": [{**one, "feature": F}]})
    assert s == 422 and f"0..{F - 1}" in m
    s, m = err({"edits": [{**one, "mode": "add"}]})
    assert s == 422 and "scale" in m and "set" in m
    s, m = err({"edits": [{**one, "pos": 5}]})  # "The cat" is 3 tokens with BOS
    assert s == 422 and "positions 0..2" in m
    s, m = err({"edits": []})
    assert s == 422 and "edits" in m
    r = client.post("/graph/intervene", json={"text": "word " * 200, "edits": [one]})
    assert r.status_code == 413 and f"at most {CIRCUIT.max_tokens}" in r.json()["error"]["message"]


def test_graph_page_interventions(graph_site):
    """edit= in the URL: the page shows the worker's clean / frozen-attention / real top tokens for those edits
    (the route's numbers are checked against own hooks above); a reload is served from the worker's graph cache."""
    import html as htmllib
    import re

    import httpx

    client, url = graph_site
    q = {"prompt": "The cat sat on the"}
    graph = httpx.post(url + "/graph", json={"text": q["prompt"]}, timeout=120).json()["graph"]
    feat = [n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"][:2]
    edits = [f"{feat[0]}:scale:3", f"{feat[1]}:set:0.5"]
    r = client.get("/graph", params={**q, "edit": edits})
    assert r.status_code == 200, r.text
    assert "cached graph" in r.text  # built by the request above: this page rebuilt nothing
    body = {"text": q["prompt"], "sae_ids": ["tc0", "tc2"], "edits": [
        {"layer": int(e.split("_")[0]), "feature": int(e.split("_")[1]), "pos": int(e.split("_")[2].split(":")[0]),
         "mode": e.split(":")[1], "value": float(e.split(":")[2])} for e in edits]}
    want = httpx.post(url + "/graph/intervene", json=body, timeout=120).json()
    table = re.search(r'<table class="checks" id="intervention-table">(.*?)</table>', r.text, re.S).group(1)
    probs = [float(x) for x in re.findall(r'<td class="num">([0-9.]+)</td>', table) if "." in x]
    expect = [round(row[k]["prob"], 4) for row in zip(want["clean"], want["frozen"], want["real"]) for k in range(3)]
    assert probs == pytest.approx(expect, abs=1e-4)
    assert all(e in htmllib.unescape(r.text) for e in edits)
    r = client.get("/graph", params={**q, "edit": "0_1_2:add:3"})
    assert r.status_code == 422 and "NODE:scale:K" in r.text
    r = client.get("/graph", params={**q, "edit": [edits[0]] * 9})
    assert r.status_code == 422 and "at most 8" in r.text
    r = client.get("/graph", params={**q, "edit": f"{feat[0]}:scale:1e9"})
    assert r.status_code == 422 and "max_abs_value" in r.text


def test_verify_memo_reuses_runs_and_changes_nothing(lms, tsets, graphs):
    """verify(memo=) (the worker's cache keeps one per graph): the same checks as without it, for two prunings,
    and a second pruning only runs the model for nodes and edges not checked before."""
    from saescope.precompute.circuits import verify as V

    lm, ts, g = lms["gpt2"], tsets[("gpt2", "all")], graphs[("gpt2", "all")]
    runs = []
    real_run = V._run
    V._run = lambda lm_, ids: (runs.append(1), real_run(lm_, ids))[1]
    try:
        memo = {}
        for nt, et in ((0.8, 0.98), (0.6, 0.9)):
            p = prune(g, nt, et)
            before = len(runs)
            fresh = verify(lm, ts, g, p, CFG)
            n_fresh = len(runs) - before
            before = len(runs)
            cached = verify(lm, ts, g, p, CFG, memo=memo)
            n_cached = len(runs) - before
            assert [(c.node, c.estimate, c.true) for c in cached[0]] == [(c.node, c.estimate, c.true) for c in fresh[0]]
            assert [(c.source, c.target, c.estimate, c.true) for c in cached[1]] == \
                [(c.source, c.target, c.estimate, c.true) for c in fresh[1]]
            assert n_cached <= n_fresh
        before = len(runs)
        verify(lm, ts, g, p, CFG, memo=memo)
        assert len(runs) == before  # everything of this pruning is remembered
    finally:
        V._run = real_run
