"""Attribution graphs on residual-stream SAEs at several layers: the linear approximation of sparse feature circuits
(Marks et al. 2024) in circuit-tracer's graph format, so `Graph`, pruning, scores, export and the checks apply as
they are.

Definition. SAEs read the residual stream at K points h_0 < h_1 < ... < h_{K-1}, one SAE per point
(`blocks.L.hook_resid_pre`: the stream entering block L; `blocks.L.hook_resid_post`: leaving it; the two names of
one point, resid_post L = resid_pre L+1, may not both be given). Graph layer k is SAE k (`meta["layer_hooks"]`
names its hook). At every SAE layer the residual is re-expressed as its SAE's features plus an error, all held as
nodes of the graph:

    x_k[p] = Σ_f a_f[p] d_f[p] + b_k[p] + e_k[p]

d_f[p] = σ_k[p] W_dec[f] (σ, μ: the SAE's input normalisation statistics `norm_stats`, frozen at the prompt; 1 and
0 for SAEs without one), b_k[p] = σ_k[p] b_dec + μ_k[p] (a bias: a constant, like every bias, never a node), e_k[p]
= x_k[p] - reconstruction (one error node per SAE layer and position). Between two SAE layers, and from the last one
to the logits, the model is its local linear model at the prompt: attention patterns and norm scales frozen at their
clean values (circuit-tracer's convention), every MLP replaced by its first-order expansion at the clean point
(y0 + J(x0)(x - x0): Marks et al.'s linear approximation). So x_{k+1} = Φ_k(x_k) is affine in x_k.

Edges. A[t, s] = c_s . ∂(v_t . x)/∂x_k[p]: c_s is what source s puts into the stream at its SAE layer k and position
p (a feature: a_s d_s; an error node: e_k[p]; a token: its embedding, the input of block 0), v_t . x the target's
input read where the target sits: a feature's pre-activation (the linear part of its encoder at SAE layer k+1:
v = W_enc[:, f] / σ (centred for layer_norm normalisation; gated SAEs: the magnitude path's W_enc exp(r_mag)),
read from the stream arriving at h_{k+1}), a logit's demeaned unembedding column . the final residual after the
frozen final norm. Because the stream is re-expressed at every SAE layer, direct edges link consecutive SAE layers
only: tokens -> SAE layer 0 features, SAE layer k nodes -> SAE layer k+1 features, the last SAE layer's nodes ->
logits; a path from layer l to m > l+1 runs through the features of the layers between (influence and total effects
sum those paths). Error and token nodes have no incoming edges. Features and errors at position 0 (BOS) are zeroed
(circuit-tracer); the stream there stays a constant.

Computing it. Backward through the real MLP evaluated at the clean point is exactly the transpose of its
linearisation, so rows are batched backward passes of one replay of the prompt (attention patterns and norm scales
replayed with replacement.py's machinery, MLPs real, so at zero probes every MLP sits at its clean point) in which
the stream at each SAE hook is cut: replaced by its clean value (a constant) plus a zero probe, whose gradient gives
the columns of that SAE layer's nodes. The tests check every edge against finite differences of a linearised model
written independently (explicit MLP Jacobians).

Scores (prune.py, unchanged): replacement score = the share of the logits' influence that reaches the tokens rather
than stopping at error nodes; completeness = the share of each node's normalised input not from error nodes
(weights I + w). Both are 1 when every SAE reconstructs its residual exactly. Neither measures the linearisation (an
exact SAE still gives a graph of the linearised model): `verify_residual` does, ablating nodes in the real model
(nothing frozen or linearised) next to the graph's estimates.

Export: circuit-tracer's format knows transcoder features and MLP errors only, so feature and error nodes keep its
`feature_type` names ("cross layer transcoder", "mlp reconstruction error") for its readers; the method, what it
assumes and each graph layer's hook go to `metadata.saescope` (`method`, `assumes`, `layer_hooks`, `layer_labels`).

Not supported: `hook_resid_mid` (a hook there changes only the MLP branch's input, not the stream the block adds
back, so the stream cannot be cut there with module hooks), transcoders mixed with residual SAEs in one graph.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..config import CIRCUIT, CircuitConfig
from ..errors import SetupError, UserError
from ..models import HookedLM, final_norm, parse_hook
from ..saes import SAE
from .graph import Graph, GraphLimitError, _partial_influence, check_prompt, logit_targets
from .prune import Pruned
from .replacement import _STATE, _Frozen, _norm_apply, _norm_kind, _norm_scale, frozen_attention
from .verify import EdgeCheck, NodeCheck, _demeaned, _run, agrees, total_effects

RESID_KINDS = ("hook_resid_pre", "hook_resid_post")
SUPPORTED_ARCHS = ("standard", "jumprelu", "topk", "gated")
METHOD = ("residual-stream SAEs (linearised): attention patterns and norm scales frozen at the prompt, MLPs "
          "linearised at the prompt (sparse feature circuits' linear approximation); the residual at each SAE layer "
          "re-expressed as features + error nodes")
ASSUMES = ("edges are gradients of the local linear model at this prompt (frozen attention patterns and norm scales, "
           "each MLP replaced by its Jacobian at the prompt); direct edges link consecutive SAE layers only (tokens "
           "feed the first SAE layer, the last one feeds the logits); error nodes hold what each SAE misses; biases "
           "are constants; the real-model checks below measure what the linearisation misses")


# ---------------------------------------------------------------- the SAEs
@dataclass
class ResidualLayer:
    """One SAE layer of the graph: an SAE reading the residual stream at `hook`."""

    sae: SAE
    hook: str  # canonical blocks.L.hook_resid_pre | hook_resid_post
    layer: int  # the model layer in the hook name
    kind: str
    name: str = ""

    @property
    def boundary(self) -> int:
        """Where in the stream: 0 = the embeddings (input of block 0), L + 1 = after block L."""
        return self.layer + (1 if self.kind == "hook_resid_post" else 0)

    def enc_dirs(self, feats: torch.Tensor) -> torch.Tensor:
        """(d, n) the linear part of the features' pre-activations (before the normalisation's 1/σ)."""
        W = self.sae.W_enc[:, feats]
        if self.sae.cfg.architecture == "gated":
            W = W * torch.exp(self.sae.r_mag[feats])
        return W.detach()

    def pre_dirs(self, feats: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(n, d) v: pre-activation of feature feats[i] at position pos[i] = v[i] . x + const (frozen statistics)."""
        W = self.enc_dirs(feats).T  # (n, d)
        if self.sae.cfg.normalize_activations == "layer_norm":
            W = W - W.mean(dim=-1, keepdim=True)
        return W / scale[pos]


@dataclass
class ResidualSAESet:
    """SAE layers sorted by their place in the stream (graph layer k = layers[k])."""

    n_layers: int  # of the model
    layers: list[ResidualLayer]
    kind: str = "residual_saes"

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.layers]

    @property
    def hooks(self) -> list[str]:
        return [r.hook for r in self.layers]

    def to(self, dtype: torch.dtype, device: str | torch.device | None = None) -> "ResidualSAESet":
        """The same set in `dtype` (a converted copy of an SAE only where its dtype/device differ)."""
        out = []
        for r in self.layers:
            p, want = r.sae.W_enc, None if device is None else torch.device(device)
            same = p.dtype == dtype and (want is None or (p.device.type == want.type
                                                          and want.index in (None, p.device.index)))
            sae = r.sae if same else copy.deepcopy(r.sae).to(dtype=dtype, device=device)
            out.append(ResidualLayer(sae, r.hook, r.layer, r.kind, r.name))
        return ResidualSAESet(self.n_layers, out, self.kind)

    @classmethod
    def from_saes(cls, saes: list[SAE], n_layers: int, names: list[str] | None = None) -> "ResidualSAESet":
        names = names or [s.cfg.source or s.cfg.hook_name or "" for s in saes]
        if not saes:
            raise UserError("no residual-stream SAEs given; a graph needs at least one (blocks.L.hook_resid_pre or "
                            "blocks.L.hook_resid_post)")
        layers, at = [], {}
        for sae, name in zip(saes, names):
            if getattr(sae, "is_transcoder", False):
                raise UserError(f"{name}: a transcoder; residual graphs take residual-stream SAEs (use the transcoder "
                                "graph for transcoders; the two are not mixed in one graph)")
            spec = parse_hook(sae.cfg.hook_name or "", n_layers)
            if spec.kind not in RESID_KINDS:
                raise UserError(f"{name} reads {spec.name}; residual graphs take SAEs at "
                                f"{' or '.join('blocks.L.' + k for k in RESID_KINDS)}")
            if sae.cfg.architecture not in SUPPORTED_ARCHS:
                raise UserError(f"{name}: architecture {sae.cfg.architecture!r}; residual graphs support "
                                f"{', '.join(SUPPORTED_ARCHS)}")
            r = ResidualLayer(sae, spec.name, spec.layer, spec.kind, name)
            if r.boundary in at:
                raise UserError(f"SAEs {at[r.boundary].name} ({at[r.boundary].hook}) and {name} ({spec.name}) read the "
                                "same point of the residual stream; give one SAE per point")
            at[r.boundary] = r
            layers.append(r)
        layers.sort(key=lambda r: r.boundary)
        return cls(n_layers, layers)


def is_residual_sae(sae: SAE, n_layers: int) -> bool:
    """Whether `sae` can be a layer of a residual graph (reads hook_resid_pre/post, a supported architecture)."""
    if getattr(sae, "is_transcoder", False) or sae.cfg.architecture not in SUPPORTED_ARCHS:
        return False
    try:
        return parse_hook(sae.cfg.hook_name or "", n_layers).kind in RESID_KINDS
    except UserError:
        return False


# ---------------------------------------------------------------- the frozen, linearised prompt
@dataclass
class ResidualReplay:
    live_in: dict[int, torch.Tensor]  # SAE layer -> (T, d) the stream arriving at its hook (targets read it)
    h_final: torch.Tensor  # (T, d) after the final norm
    logits: torch.Tensor  # (T, V)


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


class ResidualReplacement:
    """One prompt's record (attention patterns, norm scales, the stream at every SAE hook) and its replays."""

    def __init__(self, lm: HookedLM, rset: ResidualSAESet, ids: list[int], zero_bos: bool = True):
        self.lm, self.ids = lm, list(ids)
        self.dtype = lm.dtype
        self.rset = rset.to(self.dtype, lm.device)
        self.K, self.T = len(self.rset.layers), len(self.ids)
        self.state = _Frozen()
        self.scales: dict[int, torch.Tensor] = {}
        self._norms = []
        for layer in lm.layers:
            for _, child in layer.named_children():
                kind = _norm_kind(child)
                if kind:
                    self._norms.append((child, kind))
        fn = final_norm(lm.model)
        if fn is None or _norm_kind(fn) is None:
            raise SetupError(f"{type(lm.model).__name__}: no supported final norm (LayerNorm or RMSNorm)")
        self._norms.append((fn, _norm_kind(fn)))
        self._final = fn
        W_U = lm.model.get_output_embeddings()
        self.W_U = W_U.weight.detach().T  # (d, V)
        self.b_U = None if getattr(W_U, "bias", None) is None else W_U.bias.detach()
        self.zero_bos = zero_bos
        self._record()
        self._features()

    @contextmanager
    def _hooks(self, mode: str, probes: dict | None = None, live: dict | None = None) -> Iterator[None]:
        handles, st = [], self.state
        st.mode = mode
        probes = probes or {}

        def norm_hook(mod, args, out, kind):
            x = args[0]
            if mode == "record":
                s = _norm_scale(mod, kind, x).detach()
                mine = _norm_apply(mod, kind, x, s)
                if not torch.allclose(mine, out, rtol=1e-3, atol=1e-5 * float(out.abs().max()) + 1e-7):
                    raise SetupError(f"{type(mod).__name__}: its output is not a supported LayerNorm/RMSNorm "
                                     "(cannot freeze its scale)")
                self.scales[id(mod)] = s
                return out
            return _norm_apply(mod, kind, x, self.scales[id(mod)])

        for mod, kind in self._norms:
            handles.append(mod.register_forward_hook(lambda m, a, o, kind=kind: norm_hook(m, a, o, kind)))

        def embed_hook(_mod, args, kwargs):
            h = _hidden(args, kwargs)
            if mode == "record":
                self.embed = h[0].detach()
                return None
            if "embed" in probes:
                return _with_hidden(args, kwargs, h + probes["embed"][None].to(h.dtype))
            return None
        handles.append(self.lm.layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))

        def cut(k: int, h: torch.Tensor) -> torch.Tensor | None:
            """The stream arriving at SAE layer k -> what leaves it (replay: the clean value + the probe)."""
            if mode == "record":
                self.x[k] = h[0].detach()
                return None
            if live is not None:
                live[k] = h[0]
            new = self.x[k] + probes[k] if k in probes else self.x[k]
            return new[None].to(h.dtype)

        for k, r in enumerate(self.rset.layers):  # after embed_hook: at resid_pre 0 the tokens feed SAE layer 0
            block = self.lm.layers[r.layer]
            if r.kind == "hook_resid_pre":
                def pre(_mod, args, kwargs, k=k):
                    new = cut(k, _hidden(args, kwargs))
                    return None if new is None else _with_hidden(args, kwargs, new)
                handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(_mod, _args, out, k=k):
                    o = out[0] if isinstance(out, (tuple, list)) else out
                    new = cut(k, o)
                    if new is None:
                        return None
                    return (new,) + tuple(out[1:]) if isinstance(out, (tuple, list)) else new
                handles.append(block.register_forward_hook(post))

        def final_hook(_mod, _a, out):
            if live is not None:
                live["final"] = out[0]
        handles.append(self._final.register_forward_hook(final_hook))
        token = _STATE.set(st)
        try:
            with frozen_attention(self.lm):
                yield
        finally:
            _STATE.reset(token)
            for h in handles:
                h.remove()

    def _forward(self):
        return self.lm.model(input_ids=torch.tensor([self.ids], device=self.lm.device), use_cache=False)

    @torch.no_grad()
    def _record(self) -> None:
        self.x: dict[int, torch.Tensor] = {}
        with self._hooks("record"):
            self.real_logits = self._forward().logits[0].detach()  # (T, V)

    @torch.no_grad()
    def _features(self) -> None:
        """Per SAE layer: activations (BOS zeroed), the frozen normalisation scale σ (T, 1), reconstruction, error."""
        self.acts, self.sigma, self.recon, self.error = {}, {}, {}, {}
        for k, r in enumerate(self.rset.layers):
            x = self.x[k].to(r.sae.W_enc.dtype)
            a = r.sae.encode(x)
            stats = r.sae.norm_stats(x)
            rec = r.sae.denormalize(r.sae.decode(a), stats)
            err = x - rec
            if self.zero_bos:
                a[0] = 0
                err[0] = 0
            self.acts[k], self.sigma[k] = a.to(self.dtype), stats[0].to(self.dtype)
            self.recon[k], self.error[k] = rec.to(self.dtype), err.to(self.dtype)

    def replay(self, probes: dict | None = None) -> ResidualReplay:
        """A replay: probes = {'embed': (T, d) added to the input of block 0, k: (T, d) added where SAE layer k's
        stream leaves its hook}. Its gradients at zero probes are those of the linearised model."""
        live: dict = {}
        params = [p for p in self.lm.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            with self._hooks("replay", probes, live):
                self._forward()
        finally:
            for p in params:
                p.requires_grad_(True)
        h = live["final"]
        logits = h @ self.W_U + (self.b_U if self.b_U is not None else 0)
        return ResidualReplay({k: live[k] for k in range(self.K)}, h, logits)

    def demeaned_unembed(self, token: int) -> torch.Tensor:
        return self.W_U[:, token] - self.W_U.mean(dim=1)


class ResidualAttributor:
    """Rows of the full edge matrix (columns: active features, errors (SAE-layer-major), tokens) by batched
    backward passes of one replay with zero probes; the interface of graph.Attributor."""

    def __init__(self, rm: ResidualReplacement):
        self.rm = rm
        K, T = rm.K, rm.T
        layers, pos, feat, act = [], [], [], []
        for k in range(K):
            nz = rm.acts[k].nonzero()
            act.append(rm.acts[k][nz[:, 0], nz[:, 1]].cpu())
            nz = nz.cpu()
            layers.append(torch.full((len(nz),), k, dtype=torch.long))
            pos.append(nz[:, 0])
            feat.append(nz[:, 1])
        self.layer, self.pos, self.feat = torch.cat(layers), torch.cat(pos), torch.cat(feat)
        self.act = torch.cat(act).to(rm.dtype)
        self.n_active = int(self.layer.numel())
        self.n_cols = self.n_active + K * T + T
        self.E = torch.stack([rm.error[k] for k in range(K)])  # (K, T, d)
        d, dev = rm.embed.shape[-1], rm.embed.device
        self.probes = {"embed": torch.zeros(T, d, dtype=rm.dtype, device=dev, requires_grad=True)}
        for k in range(K):
            self.probes[k] = torch.zeros(T, d, dtype=rm.dtype, device=dev, requires_grad=True)
        self.replay = rm.replay(self.probes)
        self.n_backward = 0

    def _scalar(self, target: tuple[str, int]) -> torch.Tensor:
        kind, j = target
        if kind == "logit":
            return self.replay.h_final[-1] @ self.rm.demeaned_unembed(j)
        k, p, f = int(self.layer[j]), int(self.pos[j]), int(self.feat[j])
        r = self.rm.rset.layers[k]
        v = r.pre_dirs(torch.tensor([f], device=r.sae.W_enc.device), torch.tensor([p]), self.rm.sigma[k])[0]
        return self.replay.live_in[k][p] @ v.to(self.rm.dtype)

    def rows(self, targets: list[tuple[str, int]]) -> torch.Tensor:
        K, T = self.rm.K, self.rm.T
        outs = torch.stack([self._scalar(t) for t in targets])
        inputs = [self.probes["embed"]] + [self.probes[k] for k in range(K)]
        B = len(targets)
        try:
            grads = torch.autograd.grad(outs, inputs, grad_outputs=torch.eye(B, dtype=outs.dtype, device=outs.device),
                                        retain_graph=True, is_grads_batched=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one backward pass per target
            per = [torch.autograd.grad(o, inputs, retain_graph=True, allow_unused=True) for o in outs]
            grads = [torch.stack([g[i] if g[i] is not None else torch.zeros_like(inputs[i]) for g in per])
                     for i in range(len(inputs))]
        grads = [g if g is not None else torch.zeros(B, *inputs[i].shape, dtype=outs.dtype, device=outs.device)
                 for i, g in enumerate(grads)]
        self.n_backward += B
        G_emb, G = grads[0], torch.stack(grads[1:], dim=1)  # (B, T, d), (B, K, T, d)
        out = torch.zeros(B, self.n_cols, dtype=outs.dtype, device=outs.device)
        for k, r in enumerate(self.rm.rset.layers):
            m = (self.layer == k).nonzero()[:, 0]
            if not len(m):
                continue
            D = r.sae.W_dec[self.feat[m].to(r.sae.W_dec.device)].detach().to(self.rm.dtype)  # (n, d)
            D = D * self.rm.sigma[k][self.pos[m].to(D.device)]  # decoder vectors in model space
            Gs = G[:, k][:, self.pos[m].to(G.device)]  # (B, n, d)
            out[:, m.to(out.device)] = torch.einsum("bnd,nd->bn", Gs, D) * self.act[m].to(out.device)
        out[:, self.n_active:self.n_active + K * T] = torch.einsum("bktd,ktd->bkt", G, self.E).reshape(B, K * T)
        out[:, self.n_active + K * T:] = torch.einsum("btd,td->bt", G_emb, self.rm.embed)
        return out.detach().cpu()


# ---------------------------------------------------------------- the graph
def assemble(att, logit_tokens: list[int], logit_w: torch.Tensor, cfg: CircuitConfig,
             check_time: Callable[[str], None], n_err_layers: int, T: int):
    """circuit-tracer's feature selection (by influence estimated from the rows so far, when more features are
    active than `cfg.max_feature_nodes`) and the adjacency of the selected nodes -> (selected, A)."""
    n_act, dtype = att.n_active, logit_w.dtype
    n_nodes_full = att.n_cols + len(logit_tokens)
    logit_rows = torch.cat([att.rows([("logit", t) for t in logit_tokens[i:i + cfg.batch_size]])
                            for i in range(0, len(logit_tokens), cfg.batch_size)])
    check_time("logit rows")
    n_select = min(cfg.max_feature_nodes, n_act)
    feat_rows = torch.zeros(n_select, att.n_cols, dtype=dtype)
    order: list[int] = []
    visited = torch.zeros(n_act, dtype=torch.bool)
    while len(order) < n_select:
        if n_select == n_act:
            pending = [j for j in range(n_act) if not visited[j]]
        else:
            rows_so_far = torch.cat([feat_rows[: len(order)], logit_rows])
            row_node = torch.tensor(order + list(range(att.n_cols, n_nodes_full)), dtype=torch.long)
            infl = _partial_influence(rows_so_far, row_node, n_nodes_full, logit_w)[:n_act]
            rank = torch.argsort(infl, descending=True)
            pending = [int(j) for j in rank[~visited[rank]][: min(4 * cfg.batch_size, n_select - len(order))]]
        for i in range(0, len(pending), cfg.batch_size):
            batch = pending[i:i + cfg.batch_size]
            feat_rows[len(order):len(order) + len(batch)] = att.rows([("feature", j) for j in batch])
            order += batch
            visited[batch] = True
            check_time(f"feature rows, {len(order)} of {n_select}")
    sel = torch.tensor(sorted(order), dtype=torch.long)
    pos_of = {j: i for i, j in enumerate(order)}
    cols = torch.cat([sel, torch.arange(n_act, att.n_cols)])
    nl = len(logit_tokens)
    N = len(sel) + n_err_layers * T + T + nl
    A = torch.zeros(N, N, dtype=dtype)
    if len(sel):
        A[: len(sel), : N - nl] = feat_rows[[pos_of[int(j)] for j in sel]][:, cols]
    A[N - nl:, : N - nl] = logit_rows[:, cols]
    return sel, A


def build_residual_graph(lm: HookedLM, rset: ResidualSAESet, ids: list[int], prompt: str | None = None,
                         target: str | int | list | None = None, cfg: CircuitConfig = CIRCUIT) -> Graph:
    """The attribution graph of `ids` (position 0 a special token) on residual-stream SAEs (definitions above)."""
    t0 = time.monotonic()
    check_prompt(ids, cfg)
    rm = ResidualReplacement(lm, rset, ids, zero_bos=cfg.zero_bos)
    logit_tokens, logit_w = logit_targets(lm, rm.real_logits, target, cfg, rm.dtype)

    def check_time(stage: str) -> None:
        if time.monotonic() - t0 > cfg.max_seconds:
            raise GraphLimitError(f"the graph took longer than {cfg.max_seconds:g} s ({stage}); use a shorter prompt "
                                  f"or fewer feature nodes (max_feature_nodes {cfg.max_feature_nodes})")

    att = ResidualAttributor(rm)
    sel, A = assemble(att, logit_tokens, logit_w, cfg, check_time, rm.K, rm.T)
    tok = lm.tokenizer
    dec = (lambda t: tok.decode([t])) if tok is not None else str
    feats = (torch.stack([att.layer[sel], att.pos[sel], att.feat[sel]], dim=1) if len(sel)
             else torch.zeros(0, 3, dtype=torch.long))
    hooks = rm.rset.hooks
    return Graph(
        prompt=prompt if prompt is not None else "".join(dec(t) for t in ids),
        tokens=list(ids), token_strs=[dec(t) for t in ids], n_layers=rm.K, features=feats,
        activations=att.act[sel].detach(), logit_tokens=logit_tokens, logit_strs=[dec(t) for t in logit_tokens],
        logit_probs=logit_w.detach().cpu(), adjacency=A, n_active=att.n_active, covered=list(range(rm.K)),
        errors=att.E.detach().cpu(),
        meta={"method": METHOD, "assumes": ASSUMES, "kind": rset.kind, "transcoders": list(rm.rset.names),
              "layer_hooks": hooks, "layer_labels": [_label(h) for h in hooks],
              "model_layers": lm.n_layers, "seconds": time.monotonic() - t0, "backward_passes": att.n_backward,
              "feature_layers": list(range(rm.K)), "zero_bos": cfg.zero_bos},
    )


def _label(hook: str) -> str:
    spec = parse_hook(hook)
    return f"L{spec.layer} {'pre' if spec.kind == 'hook_resid_pre' else 'post'}"


# ---------------------------------------------------------------- checked against the real model
def _node_vector(g: Graph, rset: ResidualSAESet, node: int, sigma: dict[int, torch.Tensor]) -> tuple[int, int, torch.Tensor]:
    """(SAE layer, position, what the node puts into the stream there)."""
    info = g.node(node)
    k, p = info["layer"], info["pos"]
    if info["kind"] == "feature":
        sae = rset.layers[k].sae
        return k, p, info["activation"] * float(sigma[k][p]) * sae.W_dec[info["feature"]].detach()
    if info["kind"] == "error":
        return k, p, g.errors[k, p]
    raise ValueError(f"node {node} is a {info['kind']} node; only features and errors are ablated")


@contextmanager
def _stream_edit(lm: HookedLM, rset: ResidualSAESet, sub: tuple[int, int, torch.Tensor] | None,
                 capture: dict | None = None) -> Iterator[None]:
    """Real-model passes with a vector subtracted from the stream at one SAE hook and position; optionally capture
    the stream at every SAE hook (after the edit)."""
    fns = []
    for k, r in enumerate(rset.layers):
        if sub is not None and sub[0] == k:
            def edit(h, p=sub[1], v=sub[2]):
                h = h.clone()
                h[:, p] -= v.to(device=h.device, dtype=h.dtype)
                return h
            fns.append((r.hook, edit))
        if capture is not None:
            fns.append((r.hook, lambda h, k=k: capture.__setitem__(k, h[0].detach().clone())))
    with lm.hooks(fns):
        yield


def verify_residual(lm: HookedLM, rset: ResidualSAESet, g: Graph, pruned: Pruned, cfg: CircuitConfig = CIRCUIT,
                    logit: int = 0, kinds: tuple[str, ...] = ("feature", "error")) -> tuple[list[NodeCheck], list[EdgeCheck]]:
    """verify.verify for residual graphs: the top nodes ablated in the real model (the node's vector subtracted from
    the stream at its hook and position; nothing frozen or linearised) next to the graph's total-effect estimate;
    the top feature -> feature edges: the real change of the target's activation (its SAE's own encode) when the
    source is ablated, next to the graph's estimate of the change of its pre-activation."""
    rset = rset.to(lm.dtype, lm.device)
    token = g.logit_tokens[logit]
    base_x: dict = {}
    with _stream_edit(lm, rset, None, base_x):
        base = _demeaned(_run(lm, g.tokens), token)
    sigma = {k: r.sae.norm_stats(base_x[k].to(r.sae.W_enc.dtype))[0].to(lm.dtype) for k, r in enumerate(rset.layers)}
    est_all = -total_effects(g, g.adjacency[g.logit_start + logit])
    start = 0 if "feature" in kinds else g.error_start
    stop = g.token_start if "error" in kinds else g.error_start
    cand = [i for i in range(start, stop) if pruned.node_mask[i]]
    cand.sort(key=lambda i: -float(pruned.influence[i]))
    nodes = []
    for i in cand[: cfg.verify_nodes]:
        with _stream_edit(lm, rset, _node_vector(g, rset, i, sigma)):
            true = _demeaned(_run(lm, g.tokens), token) - base
        est = float(est_all[i])
        nodes.append(NodeCheck(i, est, true, agrees(est, true, cfg)))
    nf = g.n_features
    E = pruned.edge_mask[:nf, :nf] & (g.adjacency[:nf, :nf] != 0)
    pairs = E.nonzero().tolist()
    pairs.sort(key=lambda ts: -abs(float(g.adjacency[ts[0], ts[1]])))
    edges = []
    for t, s in pairs[: cfg.verify_edges]:
        tk, tp, tf = (int(v) for v in g.features[t])
        sae = rset.layers[tk].sae
        cap: dict = {}
        with torch.no_grad(), _stream_edit(lm, rset, _node_vector(g, rset, s, sigma), cap):
            _run(lm, g.tokens)
        with torch.no_grad():
            before = float(sae.encode(base_x[tk].to(sae.W_enc.dtype))[tp, tf])
            after = float(sae.encode(cap[tk].to(sae.W_enc.dtype))[tp, tf])
        est = float(-total_effects(g, g.adjacency[t])[s])
        edges.append(EdgeCheck(s, t, float(g.adjacency[t, s]), est, after - before, agrees(est, after - before, cfg)))
    return nodes, edges
