"""Attribution graphs on residual-stream SAEs (precompute/circuits/residual.py) on real tiny transformers (GPT-2 and
Llama configs) with random SAEs at every layer and at only some.

Every edge is held to a finite difference of a linearised model written here from the modules' weights: attention
as the real (eager) attention patterns times the values, norms with their scales computed here from the clean
stream, each MLP replaced by y0 + J (x - x0) with J its explicit Jacobian (torch.autograd.functional.jacobian) at the
clean point; the stream re-expressed at every SAE layer as features + error (the graph's definition). Feature
activations, decoders and errors come from numpy on the SAEs' weights; influence and pruning from test_circuits.py's
brute force; the real-model checks from this file's own hooks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from saescope.precompute.circuits.export import graph_to_json, load_graph_json
from saescope.precompute.circuits.prune import graph_scores, influence, normalize, prune
from saescope.precompute.circuits.residual import (ResidualReplacement, ResidualSAESet, build_residual_graph,
                                                   verify_residual)
from saescope.precompute.circuits.run import circuit
from saescope.precompute.config import CIRCUIT
from saescope.precompute.errors import UserError
from saescope.precompute.models import HookedLM, parse_hook
from saescope.precompute.saes import SAEConfig, load_sae, save_saelens
from saescope.precompute.saes.gated import GatedSAE
from saescope.precompute.saes.jumprelu import JumpReLUSAE
from saescope.precompute.saes.standard import StandardSAE
from saescope.precompute.saes.topk import TopKSAE
from test_circuits import _bf_influence, _bf_prune

F = 24  # features per SAE
IDS = [0, 17, 33, 2, 99, 100, 7, 250]
CFG = replace(CIRCUIT, max_feature_nodes=4096, batch_size=32)
SETUPS = {  # SAE hooks; every layer, some layers (the embeddings and a gap of two blocks), one layer
    "all": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
    "some": ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"],
    "one": ["blocks.2.hook_resid_pre"],
}


@pytest.fixture(scope="module")
def lms(tiny_family_dir):
    from transformers import AutoModelForCausalLM

    out = {}
    for fam in ("gpt2", "llama"):
        m = AutoModelForCausalLM.from_pretrained(tiny_family_dir(fam), attn_implementation="eager").double().eval()
        out[fam] = HookedLM(m, None, fam, "cpu")
    return out


# ---------------------------------------------------------------- the test's own model pieces
def _blocks(lm):
    return lm.model.transformer.h if lm.model_type == "gpt2" else lm.model.model.layers


def _norms(lm, blk):
    return (blk.ln_1, blk.ln_2) if lm.model_type == "gpt2" else (blk.input_layernorm, blk.post_attention_layernorm)


def _final(lm):
    return lm.model.transformer.ln_f if lm.model_type == "gpt2" else lm.model.model.norm


def _scale(lm, x):
    if lm.model_type == "gpt2":
        return 1 / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5)
    return 1 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _norm(lm, mod, x, s):
    if lm.model_type == "gpt2":
        return (x - x.mean(-1, keepdim=True)) * s * mod.weight + mod.bias
    return mod.weight * (x * s)


def _stream(lm, ids, edit=None):
    """The real model's residual stream by this file's hooks: {b: (T, d)} for b = 0..n (b = input of block b, n the
    final norm's input), the mid-block streams, attention patterns, logits. edit = (b, pos, vec): subtract vec there."""
    blocks, n = _blocks(lm), lm.n_layers
    S, mid, hs = {}, {}, []

    def at(b, h):
        if edit is not None and edit[0] == b:
            h = h.clone()
            h[0, edit[1]] -= edit[2]
        S[b] = h[0].detach().clone()
        return h

    for L, blk in enumerate(blocks):
        def pre(m, a, kw, L=L):
            h = a[0] if a else kw["hidden_states"]
            h = at(L, h)
            return ((h,) + tuple(a[1:]), kw) if a else (a, {**kw, "hidden_states": h})
        hs.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        hs.append(_norms(lm, blk)[1].register_forward_pre_hook(lambda m, a, L=L: mid.__setitem__(L, a[0][0].detach().clone())))
    hs.append(_final(lm).register_forward_pre_hook(lambda m, a: (at(n, a[0]),)))
    try:
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        for h in hs:
            h.remove()
    return S, mid, [a[0].detach() for a in out.attentions], out.logits[0].double()


class Linearised:
    """The prompt's local linear model, written here: frozen patterns and norm scales, MLPs by their Jacobians."""

    def __init__(self, lm, ids):
        self.lm = lm
        self.S, mid, self.P, self.logits = _stream(lm, ids)
        self.n, T = lm.n_layers, len(ids)
        self.s1 = {L: _scale(lm, self.S[L]) for L in range(self.n)}
        self.s2 = {L: _scale(lm, mid[L]) for L in range(self.n)}
        self.sf = _scale(lm, self.S[self.n])
        self.x0, self.y0, self.J = {}, {}, {}
        with torch.no_grad():
            for L, blk in enumerate(_blocks(lm)):
                x0 = _norm(lm, _norms(lm, blk)[1], mid[L], self.s2[L])
                self.x0[L], self.y0[L] = x0, blk.mlp(x0[None])[0]
        for L, blk in enumerate(_blocks(lm)):
            self.J[L] = torch.stack([torch.autograd.functional.jacobian(lambda z: blk.mlp(z[None, None])[0, 0], self.x0[L][p])
                                     for p in range(T)])  # (T, d_out, d_in)
        self.W_U = lm.model.get_output_embeddings().weight.detach().double().T

    def attn(self, L, x):
        """x (..., T, d): a batch of streams through block L's attention with its clean patterns."""
        lm, blk = self.lm, _blocks(self.lm)[L]
        n1 = _norm(lm, _norms(lm, blk)[0], x, self.s1[L])
        *lead, T, d = x.shape
        P = self.P[L]  # (H, T, T)
        H = P.shape[0]
        if lm.model_type == "gpt2":
            v = (n1 @ blk.attn.c_attn.weight + blk.attn.c_attn.bias)[..., 2 * d:]
            o = (P @ v.reshape(*lead, T, H, d // H).transpose(-3, -2)).transpose(-3, -2).reshape(*lead, T, d)
            return o @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        a = blk.self_attn
        hd = a.head_dim
        v = (n1 @ a.v_proj.weight.T).reshape(*lead, T, -1, hd).transpose(-3, -2)
        v = v.repeat_interleave(H // v.shape[-3], dim=-3)
        return (P @ v).transpose(-3, -2).reshape(*lead, T, H * hd) @ a.o_proj.weight.T

    def block(self, L, x):
        xm = x + self.attn(L, x)
        n2 = _norm(self.lm, _norms(self.lm, _blocks(self.lm)[L])[1], xm, self.s2[L])
        return xm + self.y0[L] + torch.einsum("tij,...tj->...ti", self.J[L], n2 - self.x0[L])

    def run(self, x, b0, b1):
        with torch.no_grad():
            for L in range(b0, b1):
                x = self.block(L, x)
        return x

    @torch.no_grad()
    def demeaned_logits(self, x, b, tokens):
        """x (..., T, d) at boundary b -> (..., len(tokens)) demeaned logits at the last position."""
        h = _norm(self.lm, _final(self.lm), self.run(x, b, self.n), self.sf)
        c = self.W_U[:, tokens] - self.W_U.mean(1, keepdim=True)
        return h[..., -1, :] @ c

    def demeaned_logit(self, x, b, token):
        return float(self.demeaned_logits(x, b, [token]))


def _boundary(hook):
    s = parse_hook(hook)
    return s.layer + (s.kind == "hook_resid_post")


def _sae_np(sae):
    return {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}


def _np_features(sae, x):
    """numpy: activations (BOS zeroed), σ (T, 1), decoder rows, error; x (T, d) float64."""
    w = _sae_np(sae)
    d = x.shape[1]
    sigma = np.ones((len(x), 1))
    if sae.cfg.normalize_activations == "constant_norm_rescale":
        sigma = np.linalg.norm(x, axis=1, keepdims=True) / math.sqrt(d)
    xin = x / sigma - (w["b_dec"] if sae.cfg.apply_b_dec_to_input else 0)
    arch = sae.cfg.architecture
    if arch == "gated":
        mag = np.maximum(xin @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
        a = mag * ((xin @ w["W_enc"] + w["b_gate"]) > 0)
        v = w["W_enc"] * np.exp(w["r_mag"])
    else:
        pre = xin @ w["W_enc"] + w["b_enc"]
        if arch == "jumprelu":
            a = np.maximum(pre, 0) * (pre > w["threshold"])
        elif arch == "topk":
            a = np.zeros_like(pre)
            top = np.argsort(-pre, axis=1)[:, : sae.cfg.k]
            np.put_along_axis(a, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
        else:
            a = np.maximum(pre, 0)
        v = w["W_enc"]
    rec = sigma * (a @ w["W_dec"] + w["b_dec"])
    err = x - rec
    a[0], err[0] = 0, 0
    return {"acts": a, "sigma": sigma, "W_dec": w["W_dec"], "err": err, "v": v}


def _make_sae(i, hook, d, x, g):
    """A random SAE at `hook` whose features fire on the prompt's stream x: standard, JumpReLU, TopK, gated in turn;
    the second normalises its input (constant_norm_rescale)."""
    cls = (StandardSAE, JumpReLUSAE, TopKSAE, GatedSAE)[i % 4]
    norm = "constant_norm_rescale" if i % 4 == 1 else "none"
    cfg = SAEConfig(architecture=cls.architecture, d_in=d, d_sae=F, hook_name=hook, normalize_activations=norm,
                    k=8 if cls is TopKSAE else None)
    sae = cls(cfg)
    size = math.sqrt(d) if norm != "none" else float(x[1:].norm(dim=-1).mean())
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, F, generator=g) * 1.5 / size)
        sae.W_dec.copy_(torch.randn(F, d, generator=g) * 0.3 * size / math.sqrt(d))
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.05 * size / math.sqrt(d))
        if cls.uses_b_enc:
            sae.b_enc.copy_(torch.randn(F, generator=g) * 0.3 - 0.4)
        if cls is JumpReLUSAE:
            sae.threshold.copy_(torch.rand(F, generator=g) * 0.3)
        if cls is GatedSAE:
            sae.b_gate.copy_(torch.randn(F, generator=g) * 0.3 - 0.3)
            sae.b_mag.copy_(torch.randn(F, generator=g) * 0.3)
            sae.r_mag.copy_(torch.randn(F, generator=g) * 0.2)
    return sae


def _write(root, lm, hooks, seed=0, stream=None):
    """SAELens folders for `hooks`, loaded back by load_sae (the format path users take)."""
    g = torch.Generator().manual_seed(seed)
    stream = stream or _stream(lm, IDS)[0]
    folders = []
    for i, h in enumerate(hooks):
        sae = _make_sae(i, h, lm.d_model, stream[_boundary(h)].float(), g)
        save_saelens(sae, root / f"sae{i}")
        folders.append(root / f"sae{i}")
    return folders


def _perfect(d, hook, seed):
    """relu(x R) R^T - relu(-x R) R^T = x for a signed permutation R: exactly zero error (in any float format)."""
    g = torch.Generator().manual_seed(seed)
    R = torch.zeros(d, d)
    R[torch.arange(d), torch.randperm(d, generator=g)] = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    sae = StandardSAE(SAEConfig(architecture="standard", d_in=d, d_sae=2 * d, hook_name=hook))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([R, -R], dim=1))
        sae.W_dec.copy_(torch.cat([R.T, -R.T], dim=0))
    return sae


@pytest.fixture(scope="module")
def rsets(lms, tmp_path_factory):
    out = {}
    for fam, lm in lms.items():
        stream = _stream(lm, IDS)[0]
        for setup, hooks in SETUPS.items():
            root = tmp_path_factory.mktemp(f"res_{fam}_{setup}")
            saes = [load_sae(str(f)) for f in _write(root, lm, hooks, seed=len(hooks), stream=stream)]
            out[(fam, setup)] = ResidualSAESet.from_saes(saes, lm.n_layers)
    return out


@pytest.fixture(scope="module")
def graphs(lms, rsets):
    return {key: build_residual_graph(lms[key[0]], rs, IDS, cfg=CFG) for key, rs in rsets.items()}


@pytest.fixture(scope="module")
def lins(lms):
    return {fam: Linearised(lm, IDS) for fam, lm in lms.items()}


def _independent(lin, rs):
    """Per SAE layer k: its boundary, the clean stream there and numpy's features of it."""
    out = []
    for r in rs.layers:
        b = _boundary(r.hook)
        x = lin.S[b].numpy()
        out.append({"b": b, "x": lin.S[b], **_np_features(r.sae, x)})
    return out


# ---------------------------------------------------------------- the test's model is the real one at the prompt
@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_linearised_model_reproduces_the_stream(lms, lins, fam):
    """Sanity of the reference: at the clean point the written model reproduces every block output and the logits."""
    lin = lins[fam]
    x = lin.S[0]
    for L in range(lin.n):
        x = lin.run(x, L, L + 1)
        # (Llama's RMSNorm computes in float32 inside a float64 model: agreement to float32 rounding)
        np.testing.assert_allclose(x.numpy(), lin.S[L + 1].numpy(), rtol=1e-5, atol=1e-6 * float(lin.S[L + 1].abs().max()))
        x = lin.S[L + 1]
    for t in (3, 250):
        real = float(lin.logits[-1, t] - lin.logits[-1].mean())
        assert lin.demeaned_logit(lin.S[0], 0, t) == pytest.approx(real, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- nodes
@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_nodes_are_the_saes_features_and_errors(lms, lins, rsets, graphs, fam, setup):
    g, rs = graphs[(fam, setup)], rsets[(fam, setup)]
    ind = _independent(lins[fam], rs)
    T = len(IDS)
    assert g.n_layers == len(rs.layers) and g.meta["layer_hooks"] == SETUPS[setup]
    assert "linearised" in g.meta["method"] and g.meta["assumes"]
    want = sorted((k, p, f) for k, it in enumerate(ind) for p, f in zip(*np.nonzero(it["acts"])))
    assert sorted(map(tuple, g.features.tolist())) == want and len(want) > 20
    for j in range(g.n_features):
        k, p, f = (int(v) for v in g.features[j])
        assert float(g.activations[j]) == pytest.approx(ind[k]["acts"][p, f], rel=1e-9)
    for k in range(g.n_layers):
        np.testing.assert_allclose(g.errors[k].numpy(), ind[k]["err"], rtol=1e-9, atol=1e-12 * np.abs(ind[k]["x"].numpy()).max())
        assert np.abs(ind[k]["err"][1:]).max() > 0
    assert g.n_nodes == g.n_features + g.n_layers * T + T + len(g.logit_tokens)


# ---------------------------------------------------------------- edges: finite differences of the linearised model
def _fd_matrix(lin, g, ind):
    """Rows: features then logits; columns: every non-logit node. The stream is re-expressed at each SAE layer, so a
    source at SAE layer k (tokens: the embeddings) changes only what arrives at SAE layer k + 1 (or the logits)."""
    K, T, d = g.n_layers, g.n_pos, ind[0]["x"].shape[1]
    rows = list(range(g.n_features)) + list(range(g.logit_start, g.n_nodes))

    def sources_at(k):  # SAE layer k's nodes (k = -1: tokens) -> (col, position, vector)
        if k < 0:
            return [(g.token_start + p, p, lin.S[0][p]) for p in range(T)]
        out = []
        for j in range(g.n_features):
            kk, p, f = (int(v) for v in g.features[j])
            if kk == k:
                vec = ind[k]["acts"][p, f] * ind[k]["sigma"][p, 0] * ind[k]["W_dec"][f]
                out.append((j, p, torch.from_numpy(vec)))
        out += [(g.error_start + k * T + p, p, torch.from_numpy(ind[k]["err"][p])) for p in range(T)]
        return out

    fd = np.zeros((len(rows), g.logit_start))
    for k in range(-1, K):
        b0 = 0 if k < 0 else ind[k]["b"]
        x0 = lin.S[b0]
        src = sources_at(k)
        cols = [c for c, _, _ in src]
        X = x0.repeat(len(src), 1, 1)  # one perturbed stream per source, run as a batch
        for i, (_, p, vec) in enumerate(src):
            X[i, p] += vec
        if k + 1 < K:
            b1 = ind[k + 1]["b"]
            diff = (lin.run(X, b0, b1) - lin.run(x0, b0, b1)).numpy()  # (n_src, T, d)
            for i, r in enumerate(rows[: g.n_features]):
                kk, q, f = (int(v) for v in g.features[r])
                if kk == k + 1:
                    fd[i, cols] = diff[:, q] @ (ind[kk]["v"][:, f] / ind[kk]["sigma"][q, 0])
        else:
            diff = (lin.demeaned_logits(X, b0, g.logit_tokens) - lin.demeaned_logits(x0, b0, g.logit_tokens)).numpy()
            fd[g.n_features:, cols] = diff.T
    return rows, fd


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_every_edge_is_a_finite_difference_of_the_linearised_model(lins, rsets, graphs, fam, setup):
    g, lin = graphs[(fam, setup)], lins[fam]
    ind = _independent(lin, rsets[(fam, setup)])
    rows, fd = _fd_matrix(lin, g, ind)
    A = g.adjacency[rows][:, : g.logit_start].numpy()
    scale = np.abs(A).max()
    assert scale > 0 and (A != 0).sum() > 50
    # the whole block, zeros included: every edge and every absent edge (exact up to rounding: the model is affine)
    np.testing.assert_allclose(A, fd, rtol=1e-3, atol=1e-7 * scale)
    # the structure the definition implies: only consecutive SAE layers are linked, errors/tokens have no inputs
    lay = g.features[:, 0].numpy()
    feat_block = A[: g.n_features, : g.n_features]
    assert not feat_block[lay[:, None] != lay[None, :] + 1].any()
    assert not g.adjacency[g.error_start:g.logit_start].any()
    tok = g.adjacency[: g.n_features, g.token_start:g.logit_start].numpy()
    assert not tok[lay > 0].any() and tok[lay == 0].any()
    logit_from = g.adjacency[g.logit_start:, : g.n_features].numpy()
    assert not logit_from[:, lay < g.n_layers - 1].any()
    # BOS: no feature at position 0, its error nodes are zero
    assert (g.features[:, 1] > 0).all()
    for k in range(g.n_layers):
        assert not g.adjacency[:, g.error_start + k * g.n_pos].any()


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_the_mlps_are_linearised_not_real(lins, rsets, graphs, fam):
    """A large source perturbation through the test's linearised model is exactly edge x scale; the real MLPs are
    not linear in it (so the edges are the linearised model's, not a second forward pass's)."""
    g, lin = graphs[(fam, "some")], lins[fam]
    ind = _independent(lin, rsets[(fam, "some")])
    j = int(torch.argmax(g.adjacency[g.logit_start, : g.n_features].abs()))
    k, p, f = (int(v) for v in g.features[j])
    assert k == g.n_layers - 1
    vec = torch.from_numpy(ind[k]["acts"][p, f] * ind[k]["sigma"][p, 0] * ind[k]["W_dec"][f])
    t, b = g.logit_tokens[0], ind[k]["b"]
    x = lin.S[b].clone()
    x[p] += 40 * vec
    lin_change = lin.demeaned_logit(x, b, t) - lin.demeaned_logit(lin.S[b], b, t)
    assert lin_change == pytest.approx(40 * float(g.adjacency[g.logit_start, j]), rel=1e-6)


# ---------------------------------------------------------------- exact SAEs: the graph reconstructs the logits
def _logit_reconstruction(lin, g, ind, m):
    """Demeaned logit m from the graph: what the last SAE layer holds apart from its nodes (biases, the BOS
    position) through the linearised model, plus the sum of the logit's incoming edges."""
    k = g.n_layers - 1
    x = lin.S[ind[k]["b"]].clone()
    for j in range(g.n_features):
        kk, p, f = (int(v) for v in g.features[j])
        if kk == k:
            x[p] -= torch.from_numpy(ind[k]["acts"][p, f] * ind[k]["sigma"][p, 0] * ind[k]["W_dec"][f])
    x -= torch.from_numpy(ind[k]["err"])
    rest = lin.demeaned_logit(x, ind[k]["b"], g.logit_tokens[m])
    return rest + float(g.adjacency[g.logit_start + m, : g.logit_start].sum())


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_exact_saes_reconstruct_the_logits(lms, lins, fam):
    lm, lin = lms[fam], lins[fam]
    rs = ResidualSAESet.from_saes([_perfect(lm.d_model, h, i) for i, h in enumerate(SETUPS["all"])], lm.n_layers)
    g = build_residual_graph(lm, rs, IDS, cfg=CFG)
    ind = _independent(lin, rs)
    assert all(not it["err"].any() for it in ind)  # exact by construction
    assert not g.errors.any() and not g.adjacency[:, g.error_start:g.token_start].any()
    assert graph_scores(g) == pytest.approx((1.0, 1.0), abs=1e-12)
    # the replay (SAE layers re-expressed as their features, nothing added) is the model at the prompt
    rm = ResidualReplacement(lm, rs, IDS)
    np.testing.assert_allclose(rm.replay().logits.detach().numpy(), lin.logits.numpy(), rtol=0,
                               atol=1e-5 * float(lin.logits.abs().max()))
    for m, t in enumerate(g.logit_tokens):
        real = float(lin.logits[-1, t] - lin.logits[-1].mean())
        assert _logit_reconstruction(lin, g, ind, m) == pytest.approx(real, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("key", [("gpt2", "all"), ("llama", "some")])
def test_imperfect_saes_reconstruct_the_logits_with_their_errors(lins, rsets, graphs, key):
    g, lin = graphs[key], lins[key[0]]
    ind = _independent(lin, rsets[key])
    r, c = graph_scores(g)
    assert 0 < r < 1 and 0 < c < 1
    for m, t in enumerate(g.logit_tokens):
        real = float(lin.logits[-1, t] - lin.logits[-1].mean())
        assert _logit_reconstruction(lin, g, ind, m) == pytest.approx(real, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- influence, pruning, scores, export: unchanged
@pytest.fixture(scope="module")
def small_graphs(lms, rsets):
    """Graphs of 40 feature nodes chosen by influence (circuit-tracer's selection): small enough for matrix powers."""
    cfg = replace(CFG, max_feature_nodes=40, batch_size=8)
    return {key: build_residual_graph(lms[key[0]], rsets[key], IDS, cfg=cfg) for key in rsets}


@pytest.mark.parametrize("key", [("gpt2", "all"), ("llama", "some"), ("llama", "all"), ("gpt2", "one")])
def test_feature_selection_keeps_full_rows(graphs, small_graphs, key):
    full, small = graphs[key], small_graphs[key]
    assert small.n_features == 40 < full.n_features and small.n_active == full.n_active
    sel = [full.feature_index(*map(int, f)) for f in small.features]
    cols = sel + list(range(full.error_start, full.n_nodes))
    np.testing.assert_allclose(small.adjacency.numpy(), full.adjacency[cols][:, cols].numpy(), rtol=1e-9, atol=1e-14)
    # the first visited are the features with the strongest direct logit edges
    top_direct = int(full.adjacency[full.logit_start:, : full.n_features].abs().sum(0).argmax())
    assert top_direct in sel


@pytest.mark.parametrize("key", [("gpt2", "all"), ("llama", "some"), ("llama", "all")])
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9)])
def test_influence_and_pruning_match_brute_force(small_graphs, key, thresholds):
    g = small_graphs[key]
    A, w = g.adjacency.numpy(), g.logit_weights().numpy()
    bf, An = _bf_influence(A, w)
    np.testing.assert_allclose(influence(normalize(g.adjacency), g.logit_weights()).numpy(), bf, rtol=1e-9, atol=1e-15)
    p = prune(g, *thresholds)
    keep, edges, _ = _bf_prune(g, *thresholds)
    assert np.array_equal(p.node_mask.numpy(), keep)
    assert np.array_equal(p.edge_mask.numpy(), edges)
    assert keep.sum() < len(keep) and edges.sum() < (A != 0).sum()
    err = slice(g.error_start, g.token_start)
    tok = bf[g.token_start:g.logit_start].sum()
    comp = ((1 - An[:, err].sum(1)) * (bf + w)).sum() / (bf + w).sum()
    np.testing.assert_allclose(graph_scores(g), [tok / (tok + bf[err].sum()), comp], rtol=1e-10)


def test_fewer_sae_layers_the_errors_carry_more(graphs):
    """One SAE layer: tokens reach the logits through one layer of features or its errors."""
    for fam in ("gpt2", "llama"):
        g = graphs[(fam, "one")]
        assert g.n_layers == 1 and g.meta["layer_labels"] == ["L2 pre"]
        assert 0 < graph_scores(g)[0] < 1


@pytest.mark.parametrize("key", [("gpt2", "all"), ("llama", "some")])
def test_json_export_round_trips(graphs, key):
    import json

    g = graphs[key]
    data = graph_to_json(g, prune(g), graph_scores(g), slug="r")
    text = json.dumps(data)
    assert json.dumps(load_graph_json(text).to_json()) == text
    meta = data["metadata"]["saescope"]
    assert "linearised" in meta["method"] and meta["assumes"] and meta["layer_labels"] == g.meta["layer_labels"]
    assert meta["n_layers"] == g.n_layers
    assert {n["feature_type"] for n in data["nodes"]} >= {"cross layer transcoder", "embedding", "logit"}


# ---------------------------------------------------------------- checked against the real model
def _own_delta(lin, g, ind, node):
    n = g.node(node)
    k, p = n["layer"], n["pos"]
    if n["kind"] == "feature":
        return ind[k]["b"], p, torch.from_numpy(ind[k]["acts"][p, n["feature"]] * ind[k]["sigma"][p, 0] * ind[k]["W_dec"][n["feature"]])
    return ind[k]["b"], p, torch.from_numpy(ind[k]["err"][p])


@pytest.mark.parametrize("key", [("gpt2", "all"), ("llama", "some")])
def test_verification_equals_own_ablation(lms, lins, rsets, graphs, key):
    lm, g, rs, lin = lms[key[0]], graphs[key], rsets[key], lins[key[0]]
    ind = _independent(lin, rs)
    nodes, edges = verify_residual(lm, rs, g, prune(g), replace(CFG, verify_nodes=6, verify_edges=6))
    assert len(nodes) == 6 and len(edges) >= 3
    tok = g.logit_tokens[0]
    dm = lambda lg: float(lg[-1, tok] - lg[-1].mean())  # noqa: E731
    for nc in nodes:
        *_, lg = _stream(lm, IDS, _own_delta(lin, g, ind, nc.node))
        assert nc.true == pytest.approx(dm(lg) - dm(lin.logits), rel=1e-9, abs=1e-12)
    for ec in edges:
        t = g.node(ec.target)
        S1 = _stream(lm, IDS, _own_delta(lin, g, ind, ec.source))[0]
        after = _np_features(rs.layers[t["layer"]].sae, S1[ind[t["layer"]]["b"]].numpy())["acts"][t["pos"], t["feature"]]
        assert ec.true == pytest.approx(after - ind[t["layer"]]["acts"][t["pos"], t["feature"]], rel=1e-9, abs=1e-12)
        assert ec.weight == float(g.adjacency[ec.target, ec.source])
    # the whole call: circuit() picks the residual path for a ResidualSAESet
    res = circuit(lm, rs, IDS, cfg=replace(CFG, verify_nodes=2, verify_edges=2))
    assert res.graph.meta["kind"] == "residual_saes" and len(res.node_checks) == 2
    assert torch.equal(res.graph.adjacency, g.adjacency)


# ---------------------------------------------------------------- what is refused
def test_bad_sae_sets_are_refused(lms, tmp_path):
    lm = lms["gpt2"]
    d = lm.d_model
    with pytest.raises(UserError, match="same point of the residual stream"):
        ResidualSAESet.from_saes([_perfect(d, "blocks.0.hook_resid_post", 0), _perfect(d, "blocks.1.hook_resid_pre", 1)], 3)
    with pytest.raises(UserError, match="hook_resid_pre or blocks.L.hook_resid_post"):
        ResidualSAESet.from_saes([_perfect(d, "blocks.1.hook_resid_mid", 0)], 3)
    with pytest.raises(UserError, match="at least one"):
        ResidualSAESet.from_saes([], 3)
    from saescope.precompute.saes.transcoder import Transcoder

    tc = Transcoder(SAEConfig(architecture="transcoder", d_in=d, d_sae=4, hook_name="blocks.0.hook_mlp_in",
                              hook_name_out="blocks.0.hook_mlp_out"))
    with pytest.raises(UserError, match="a transcoder"):
        ResidualSAESet.from_saes([tc], 3)


# ---------------------------------------------------------------- the worker's /graph
def _attn_out_sae(root, d):
    sae = StandardSAE(SAEConfig(architecture="standard", d_in=d, d_sae=8, hook_name="blocks.1.hook_attn_out"))
    save_saelens(sae, root / "attn")
    return str(root / "attn")


@pytest.fixture(scope="module")
def residual_worker(tiny_lm_dir, tiny_sae_dir, second_sae_dir, tmp_path_factory):
    """A worker whose SAEs are residual-stream SAEs only: the TopK SAE moved to blocks.0.hook_resid_post and the
    ReLU one at blocks.2.hook_resid_pre."""
    from fastapi.testclient import TestClient

    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes import create_worker_app

    early = tmp_path_factory.mktemp("early")
    sae = load_sae(str(tiny_sae_dir))
    sae.cfg.hook_name = "blocks.0.hook_resid_post"
    save_saelens(sae, early)
    engine = build_engine(str(tiny_lm_dir), {"tiny": str(early), "second": str(second_sae_dir)}, {}, "cpu", "float32")
    with TestClient(create_worker_app(engine)) as client:
        yield client, engine


def test_worker_builds_residual_graphs(residual_worker):
    client, engine = residual_worker
    r = client.post("/graph", json={"text": "The cat sat on the", "verify": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sae_ids"] == {"0": "tiny", "1": "second"}
    meta = body["graph"]["metadata"]["saescope"]
    assert "residual-stream SAEs" in meta["method"] and "Jacobian" in meta["assumes"]
    assert meta["layer_labels"] == ["L0 post", "L2 pre"] and meta["n_layers"] == 2
    assert load_graph_json(body["graph"]).to_json() == body["graph"]
    assert body["node_checks"] and 0 < body["replacement_score"] < 1
    # the same graph as precompute's own call on the worker's model and SAEs
    rs = ResidualSAESet.from_saes([engine.saes["tiny"], engine.saes["second"]], engine.lm.n_layers)
    direct = circuit(engine.lm, rs, "The cat sat on the", check=False)
    assert {(lk["source"], lk["target"]) for lk in body["graph"]["links"]} == \
        {(lk["source"], lk["target"]) for lk in direct.to_json()["links"]}
    one = client.post("/graph", json={"text": "The cat sat on the", "sae_ids": ["second"], "verify": False}).json()
    assert one["sae_ids"] == {"0": "second"}


def test_worker_refuses_without_transcoders_or_residual_saes(tiny_lm_dir, tiny_sae_dir, second_sae_dir, tmp_path):
    from fastapi.testclient import TestClient

    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes import create_worker_app

    engine = build_engine(str(tiny_lm_dir), {"attn": _attn_out_sae(tmp_path, 64)}, {}, "cpu", "float32")
    with TestClient(create_worker_app(engine)) as c:
        r = c.post("/graph", json={"text": "The cat"})
    msg = r.json()["error"]["message"]
    assert r.status_code == 422 and "no transcoders and no residual-stream SAEs" in msg
    assert "blocks.1.hook_attn_out" in msg and "hook_resid_post" in msg
    # two residual SAEs at one point of the stream (blocks.1.hook_resid_post = blocks.2.hook_resid_pre): name one
    engine = build_engine(str(tiny_lm_dir), {"a": str(tiny_sae_dir), "b": str(second_sae_dir)}, {}, "cpu", "float32")
    with TestClient(create_worker_app(engine)) as c:
        r = c.post("/graph", json={"text": "The cat"})
        msg = r.json()["error"]["message"]
        assert r.status_code == 422 and "same point of the residual stream" in msg and "sae_ids" in msg
        assert c.post("/graph", json={"text": "The cat", "sae_ids": ["a"], "verify": False}).status_code == 200
        r = c.post("/graph", json={"text": "The cat", "sae_ids": ["nope"]})
        assert r.status_code == 404 and "residual-stream SAEs: a, b" in r.json()["error"]["message"]


# ---------------------------------------------------------------- the /graph page says which method made the graph
@pytest.mark.slow
def test_graph_page_names_the_residual_method(residual_worker, tiny_store):
    """The dashboard over a real uvicorn worker that has residual SAEs only: the page says the method, what it
    assumes and labels each SAE row by its hook; its nodes are the worker's graph's."""
    import re
    import threading
    import time

    import httpx
    import uvicorn
    from fastapi.testclient import TestClient

    from conftest import free_port
    from saescope.app.web.app import create_app
    from saescope.app.worker.routes import create_worker_app

    _, engine = residual_worker
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_worker_app(engine), host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        graph = httpx.post(url + "/graph", json={"text": "The cat sat on the"}, timeout=120).json()["graph"]
        r = TestClient(create_app(tiny_store, worker_url=url)).get("/graph", params={"prompt": "The cat sat on the"})
        assert r.status_code == 200, r.text
        html = r.text
        method = re.search(r'<p class="muted" id="graph-method">(.*?)</p>', html, re.S).group(1)
        assert "residual-stream SAEs (linearised)" in method and "SAE layers: L0 post, L2 pre" in method
        assert 'id="graph-assumes">edges are gradients of the local linear model' in method
        assert "a layer without a transcoder" not in method
        assert re.search(r'class="rowlabel">L0 post<', html) and re.search(r'class="rowlabel">L2 pre<', html)
        ids = re.findall(r'<g class="node [^"]*" data-id="([^"]+)"', html)
        assert sorted(ids) == sorted(n["node_id"] for n in graph["nodes"])
    finally:
        server.should_exit = True
        th.join(timeout=10)
