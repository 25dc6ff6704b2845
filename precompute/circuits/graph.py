"""Attribution graphs as circuit-tracer defines them, computed on saescope's replacement model.

Nodes, in this order (circuit-tracer's): the selected active features (layer, position, feature), one error node
per (layer, position) (layer-major), one token node per position, and the logit nodes (the top tokens until their
cumulative probability reaches `logit_prob`, at most `max_logits`, or the targets the user names).

Edge A[t, s] = (a_s d_s) . d(v_t . h_t)/dr: the source's activation times its decoder vector(s) (an error node:
its error vector; a token: its embedding) dotted with the gradient, at the MLP output(s) (embedding) where the
source writes, of the target's input v_t . h_t in the frozen replacement model (replacement.py): a feature's
pre-activation (encoder row . transcoder input), a logit's demeaned unembedding column (W_U[:, t] - mean over
the vocabulary) . final residual after the (frozen) final norm. A CLT feature writes to its own and every later
layer's MLP output: its edge sums over them. Rows are computed by batched backward passes.

With more active features than `max_feature_nodes`, features are visited in order of their influence estimated
from the rows computed so far (circuit-tracer's procedure); the edges of unvisited features are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import CIRCUIT, CircuitConfig
from ..errors import UserError, echo
from ..models import HookedLM
from .replacement import ReplacementModel
from .transcoders import TranscoderSet


class GraphLimitError(UserError):
    """A graph beyond the configured bounds (tokens, feature nodes, seconds); the message names the limit."""


@dataclass
class Graph:
    prompt: str
    tokens: list[int]
    token_strs: list[str]
    n_layers: int
    features: torch.Tensor  # (n_f, 3) long: layer, position, feature index
    activations: torch.Tensor  # (n_f,)
    logit_tokens: list[int]
    logit_strs: list[str]
    logit_probs: torch.Tensor  # (n_logits,)
    adjacency: torch.Tensor  # (N, N): rows are targets, columns sources
    n_active: int = 0  # active features before selection
    covered: list[int] = field(default_factory=list)  # layers whose MLP output features write to
    errors: torch.Tensor | None = None  # (n_layers, T, d) error vectors (verification ablates them); not exported
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + len(self.logit_tokens)

    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.logit_start:] = self.logit_probs.to(w.dtype)
        return w

    def node(self, i: int) -> dict[str, Any]:
        """Kind, layer, position and (feature index | token id) of node i."""
        if i < self.n_features:
            l, p, f = (int(v) for v in self.features[i])
            return {"kind": "feature", "layer": l, "pos": p, "feature": f, "activation": float(self.activations[i])}
        if i < self.token_start:
            l, p = divmod(i - self.error_start, self.n_pos)
            return {"kind": "error", "layer": l, "pos": p}
        if i < self.logit_start:
            p = i - self.token_start
            return {"kind": "token", "layer": -1, "pos": p, "token": self.tokens[p]}
        k = i - self.logit_start
        return {"kind": "logit", "layer": self.n_layers, "pos": self.n_pos - 1, "token": self.logit_tokens[k],
                "prob": float(self.logit_probs[k])}

    def feature_index(self, layer: int, pos: int, feature: int) -> int | None:
        hit = ((self.features[:, 0] == layer) & (self.features[:, 1] == pos) & (self.features[:, 2] == feature)).nonzero()
        return int(hit[0, 0]) if len(hit) else None


# ---------------------------------------------------------------- prompts and targets
def prompt_ids(lm: HookedLM, prompt: str) -> list[int]:
    """Token ids of a prompt, with a special token at position 0 (BOS; circuit-tracer prepends one if missing)."""
    tok = lm.tokenizer
    ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    special = set(getattr(tok, "all_special_ids", []) or [])
    if not ids or ids[0] not in special:
        bos = next((t for t in (tok.bos_token_id, tok.eos_token_id, *sorted(special)) if t is not None), None)
        if bos is None:
            raise UserError("the tokenizer has no BOS or other special token to put at position 0")
        ids = [bos] + ids
    return ids


def resolve_target(lm: HookedLM, target: str | int) -> int:
    """A named logit target: a token id, or a string that is exactly one token."""
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit() and lm.tokenizer is None):
        t = int(target)
        if not 0 <= t < vocab:
            raise UserError(f"target token id {t} is outside the vocabulary (0..{vocab - 1})")
        return t
    ids = lm.tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"target {echo(target)} is {len(ids)} tokens; a logit target must be exactly one token "
                        "(include a leading space if the word follows one)")
    return int(ids[0])


def salient_logits(probs: torch.Tensor, max_logits: int, logit_prob: float) -> list[int]:
    """The top tokens until cumulative probability >= logit_prob, at most max_logits (circuit-tracer's rule)."""
    top_p, top_i = probs.topk(min(max_logits, probs.numel()))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(logit_prob, dtype=top_p.dtype))) + 1
    return [int(t) for t in top_i[:cutoff]]


# ---------------------------------------------------------------- rows of the adjacency matrix
class Attributor:
    """Rows of the full (all active features) edge matrix from backward passes of one replay.

    method "batched" (the default): one backward pass per batch of targets, vectorised over them
    (`is_grads_batched`); should an op lack a batching rule, that batch falls back to one pass per target.
    method "per_target": one backward pass per target (the reference the tests hold the batched path to).
    Autograd only visits what the targets depend on: a batch of targets at layers <= l runs through the layers
    below l only (build_graph sorts each batch by layer). Each row is then read off the gradients at the MLP outputs
    by one small batched product per layer (features grouped by position, activation folded into the decoder)."""

    METHODS = ("batched", "per_target")

    def __init__(self, rm: ReplacementModel, method: str = "batched"):
        if method not in self.METHODS:
            raise ValueError(f"method {method!r}; valid: {', '.join(self.METHODS)}")
        self.rm, self.method = rm, method
        L, T = rm.n_layers, rm.T
        layers, pos, feat, act = [], [], [], []
        for l in sorted(rm.acts):
            nz = rm.acts[l].nonzero().cpu()
            layers.append(torch.full((len(nz),), l, dtype=torch.long))
            pos.append(nz[:, 0])
            feat.append(nz[:, 1])
            act.append(rm.acts[l][nz[:, 0].to(rm.acts[l].device), nz[:, 1].to(rm.acts[l].device)])
        cat = (lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt))
        self.layer, self.pos, self.feat = cat(layers, torch.long), cat(pos, torch.long), cat(feat, torch.long)
        self.act = cat([a.cpu() for a in act], rm.dtype)
        self.n_active = int(self.layer.numel())
        self.n_cols = self.n_active + L * T + T
        self.E = torch.stack([rm.error[l] for l in range(L)])  # (L, T, d)
        d, dev = rm.embed.shape[-1], rm.embed.device
        # per source layer: its active features as a (T, n_max) grid of columns (padding: column n_cols, dropped)
        # and, per output layer it writes to, (T, d, n_max) decoder rows scaled by the activations
        self._grid: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        for l, enc in rm.tset.encoders.items():
            m = (self.layer == l).nonzero()[:, 0]
            if not len(m):
                continue
            p = self.pos[m]
            counts = torch.bincount(p, minlength=T)
            slot = torch.arange(len(m)) - (torch.cumsum(counts, 0) - counts)[p]  # rank within its position
            n_max = int(counts.max())
            cols = torch.full((T, n_max), self.n_cols, dtype=torch.long)
            cols[p, slot] = m
            dec = {}
            for o in enc.out_layers:
                D = torch.zeros(T, n_max, d, dtype=rm.dtype, device=dev)
                D[p.to(dev), slot.to(dev)] = enc.W_dec[self.feat[m].to(enc.W_dec.device), o - l].to(dev) * \
                    self.act[m].to(dev)[:, None]
                dec[o] = D.transpose(1, 2).contiguous()
            self._grid[l] = (cols.reshape(-1).to(dev), dec)
        self.probes = {k: torch.zeros(T, d, dtype=rm.dtype, device=dev, requires_grad=True) for k in ["embed", *range(L)]}
        with torch.enable_grad():
            self.replay = rm.replay(self.probes)
        self.n_rows = 0  # rows computed
        self.n_backward = 0  # backward passes run

    def _scalar(self, target: tuple[str, int]) -> torch.Tensor:
        kind, j = target
        if kind == "logit":
            return self.replay.h_final[-1] @ self.rm.demeaned_unembed(j)
        l, p, f = int(self.layer[j]), int(self.pos[j]), int(self.feat[j])
        return self.replay.x_in[l][p] @ self.rm.tset.encoders[l].W_enc[:, f]

    def _scalars(self, targets: list[tuple[str, int]]) -> torch.Tensor:
        """(n,) the targets' inputs as one product per layer, (n_l, T*d) @ x (the target's encoder row (a logit: its
        demeaned unembedding) at its position): backward passes get plain matrix products, no indexing."""
        T, dev, dt = self.rm.T, self.rm.embed.device, self.rm.dtype
        groups: dict = {}
        for b, (kind, j) in enumerate(targets):
            groups.setdefault("final" if kind == "logit" else int(self.layer[j]), []).append((b, j))
        parts, where = [], []
        for key, items in groups.items():
            js = [j for _, j in items]
            if key == "final":
                x, p = self.replay.h_final, torch.full((len(js),), T - 1, dtype=torch.long)
                W = self.rm.demeaned_unembed(js)  # (d, n)
            else:
                x, p = self.replay.x_in[key], self.pos[js]
                W = self.rm.tset.encoders[key].W_enc[:, self.feat[js].to(dev)]
            M = torch.zeros(len(js), T, x.shape[-1], dtype=dt, device=dev)
            M[torch.arange(len(js)), p.to(dev)] = W.T.to(dt)
            parts.append(M.reshape(len(js), -1) @ x.reshape(-1))
            where += [b for b, _ in items]
        order = torch.empty(len(targets), dtype=torch.long)
        order[torch.tensor(where)] = torch.arange(len(targets))
        return torch.cat(parts)[order.to(dev)]

    def _grads(self, targets: list[tuple[str, int]]) -> list[torch.Tensor | None]:
        """Per input (embedding, MLP outputs 0..L-1): (n, T, d) gradients of the targets; None where none reach."""
        inputs = [self.probes["embed"]] + [self.probes[l] for l in range(self.rm.n_layers)]
        outs = self._scalars(targets)
        if self.method == "batched":
            try:
                grads = torch.autograd.grad(outs, inputs, grad_outputs=torch.eye(len(targets), dtype=outs.dtype,
                                            device=outs.device), retain_graph=True, is_grads_batched=True,
                                            allow_unused=True)
                self.n_backward += 1
                return list(grads)
            except RuntimeError:  # an op without a batching rule: one backward pass per target
                pass
        per = []
        for o in outs:
            per.append(torch.autograd.grad(o, inputs, retain_graph=True, allow_unused=True))
            self.n_backward += 1
        return [None if all(g[i] is None for g in per) else
                torch.stack([g[i] if g[i] is not None else torch.zeros_like(x) for g in per])
                for i, x in enumerate(inputs)]

    def rows(self, targets: list[tuple[str, int]]) -> torch.Tensor:
        """(n, n_cols): columns [active features, errors (layer-major), tokens]."""
        L, T, n = self.rm.n_layers, self.rm.T, len(targets)
        with torch.enable_grad():
            grads = self._grads(targets)
        self.n_rows += n
        dev = self.rm.embed.device
        out = torch.zeros(n, self.n_cols + 1, dtype=self.rm.dtype, device=dev)  # + the padding column
        G = grads[1:]  # per MLP output layer: (n, T, d), None above the targets
        for l, (cols, dec) in self._grid.items():
            acc = None
            for o, D in dec.items():
                if G[o] is not None:  # (T, n, d) @ (T, d, n_max) -> (T, n, n_max)
                    part = torch.bmm(G[o].transpose(0, 1), D)
                    acc = part if acc is None else acc + part
            if acc is not None:
                out[:, cols] = acc.transpose(0, 1).reshape(n, -1)
        for l in range(L):
            if G[l] is not None:
                out[:, self.n_active + l * T:self.n_active + (l + 1) * T] = torch.einsum("btd,td->bt", G[l], self.E[l])
        if grads[0] is not None:
            out[:, self.n_active + L * T:self.n_cols] = torch.einsum("btd,td->bt", grads[0], self.rm.embed)
        return out[:, : self.n_cols].detach().cpu()


def _partial_influence(rows: torch.Tensor, row_node: torch.Tensor, n_nodes: int, logit_w: torch.Tensor,
                       max_iter: int = 1024) -> torch.Tensor:
    """Influence on the logits of every node from the rows computed so far (rows indexed by node id)."""
    norm = rows.abs()
    norm = norm / norm.sum(dim=1, keepdim=True).clamp(min=1e-30)
    prod = torch.zeros(n_nodes, dtype=rows.dtype)
    prod[-len(logit_w):] = logit_w
    infl = torch.zeros(n_nodes, dtype=rows.dtype)
    for _ in range(max_iter):
        nxt = torch.zeros(n_nodes, dtype=rows.dtype)
        nxt[: rows.shape[1]] = prod[row_node] @ norm
        prod = nxt
        if not prod.any():
            return infl
        infl += prod
    raise RuntimeError("influence did not converge (the edge matrix is not acyclic)")


def check_prompt(ids: list[int], cfg: CircuitConfig) -> None:
    """A graph's prompt bounds (BOS included), the limit named."""
    if len(ids) > cfg.max_tokens:
        raise GraphLimitError(f"the prompt is {len(ids)} tokens; a graph allows at most {cfg.max_tokens} "
                              "(BOS included); shorten the prompt")
    if len(ids) < 2:
        raise UserError("the prompt needs at least one token after BOS")


def logit_targets(lm: HookedLM, real_logits: torch.Tensor, target, cfg: CircuitConfig, dtype) -> tuple[list[int], torch.Tensor]:
    """The logit nodes (named targets, or the salient tokens) and their probabilities at the last position."""
    probs = torch.softmax(real_logits[-1].double().cpu(), dim=-1)
    if target is None or target == "":
        logit_tokens = salient_logits(probs, cfg.max_logits, cfg.logit_prob)
    else:
        tl = target if isinstance(target, list) else [target]
        logit_tokens = list(dict.fromkeys(resolve_target(lm, t) for t in tl))
        if len(logit_tokens) > cfg.max_logits:
            raise GraphLimitError(f"{len(logit_tokens)} logit targets; at most {cfg.max_logits}")
    logit_w = probs[logit_tokens].to(dtype)
    return logit_tokens, logit_w


def build_graph(lm: HookedLM, tset: TranscoderSet, ids: list[int], prompt: str | None = None,
                target: str | int | list | None = None, cfg: CircuitConfig = CIRCUIT) -> Graph:
    """The attribution graph of `ids` (position 0 a special token) for the logit targets (default: salient)."""
    t0 = time.monotonic()
    check_prompt(ids, cfg)
    rm = ReplacementModel(lm, tset, ids, zero_bos=cfg.zero_bos)
    logit_tokens, logit_w = logit_targets(lm, rm.real_logits, target, cfg, rm.dtype)

    def check_time(stage: str) -> None:
        if time.monotonic() - t0 > cfg.max_seconds:
            raise GraphLimitError(f"the graph took longer than {cfg.max_seconds:g} s ({stage}); use a shorter prompt "
                                  f"or fewer feature nodes (max_feature_nodes {cfg.max_feature_nodes})")

    att = Attributor(rm)
    n_act, L, T = att.n_active, rm.n_layers, rm.T
    n_nodes_full = att.n_cols + len(logit_tokens)
    logit_rows = torch.cat([att.rows([("logit", t) for t in logit_tokens[i:i + cfg.batch_size]])
                            for i in range(0, len(logit_tokens), cfg.batch_size)])
    check_time("logit rows")
    n_select = min(cfg.max_feature_nodes, n_act)
    feat_rows = torch.zeros(n_select, att.n_cols, dtype=rm.dtype)
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
        pending.sort(key=lambda j: int(att.layer[j]))  # a batch's backward pass only runs below its highest layer
        for i in range(0, len(pending), cfg.batch_size):
            batch = pending[i:i + cfg.batch_size]
            feat_rows[len(order):len(order) + len(batch)] = att.rows([("feature", j) for j in batch])
            order += batch
            visited[batch] = True
            check_time(f"feature rows, {len(order)} of {n_select}")
    sel = torch.tensor(sorted(order), dtype=torch.long)
    pos_of = {j: k for k, j in enumerate(order)}
    cols = torch.cat([sel, torch.arange(n_act, att.n_cols)])
    N = len(sel) + L * T + T + len(logit_tokens)
    A = torch.zeros(N, N, dtype=rm.dtype)
    if len(sel):
        A[: len(sel), : N - len(logit_tokens)] = feat_rows[[pos_of[int(j)] for j in sel]][:, cols]
    A[N - len(logit_tokens):, : N - len(logit_tokens)] = logit_rows[:, cols]
    tok = lm.tokenizer
    dec = (lambda t: tok.decode([t])) if tok is not None else str
    feats = torch.stack([att.layer[sel], att.pos[sel], att.feat[sel]], dim=1) if len(sel) else torch.zeros(0, 3, dtype=torch.long)
    return Graph(
        prompt=prompt if prompt is not None else "".join(dec(t) for t in ids),
        tokens=list(ids), token_strs=[dec(t) for t in ids], n_layers=L, features=feats,
        activations=att.act[sel].detach(), logit_tokens=logit_tokens, logit_strs=[dec(t) for t in logit_tokens],
        logit_probs=logit_w.detach().cpu(), adjacency=A, n_active=n_act, covered=sorted(tset.covered),
        errors=att.E.detach().cpu(),
        meta={"method": f"transcoders ({tset.kind}): attention patterns and norm scales frozen at the prompt, "
                        "MLP outputs replaced by transcoder features + error nodes",
              "kind": tset.kind, "transcoders": list(tset.names), "input_hook": tset.input_kind,
              "seconds": time.monotonic() - t0, "rows": att.n_rows, "backward_passes": att.n_backward,
              "feature_layers": sorted(tset.encoders), "zero_bos": cfg.zero_bos},
    )
