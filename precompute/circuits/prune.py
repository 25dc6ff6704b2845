"""Influence, pruning and the graph scores, with circuit-tracer's definitions.

Â = |A| with each row divided by its sum (rows of error and token nodes stay zero). The graph is acyclic, so Â is
nilpotent and the influence of every node on the logits, I = w (Â + Â² + ...), is the finite sum computed here as
w (I - Â)^{-1} - w by repeated multiplication until it vanishes; w holds the logit probabilities on logit nodes.

Pruning: keep the nodes holding `node_threshold` of the cumulative influence (tokens and logits always), zero the
rest, score each edge by Â'[t, s] (I'(t) + w(t)) on the pruned matrix, keep the edges holding `edge_threshold`
of the total score, then drop feature/error nodes without outgoing edges and features without incoming ones
until nothing changes.

Replacement score: token influence / (token + error influence). Completeness score: the share of each node's
normalised input that is not from error nodes, averaged with weights I + w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CIRCUIT
from ..errors import UserError
from .graph import Graph


def normalize(A: torch.Tensor) -> torch.Tensor:
    n = A.abs()
    return n / n.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(An: torch.Tensor, w: torch.Tensor, max_iter: int = 4096) -> torch.Tensor:
    """w (Â + Â² + ...) for a nilpotent Â (an acyclic graph)."""
    cur = w @ An
    total = cur.clone()
    for _ in range(max_iter):
        if not cur.any():
            return total
        cur = cur @ An
        total += cur
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def node_influence(g: Graph) -> torch.Tensor:
    return influence(normalize(g.adjacency), g.logit_weights())


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest score among those that, taken largest first, reach `threshold` of the total."""
    s = torch.sort(scores.flatten(), descending=True).values
    cum = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype))), len(s) - 1)
    return s[i]


@dataclass
class Pruned:
    node_mask: torch.Tensor  # (N,) bool
    edge_mask: torch.Tensor  # (N, N) bool
    influence: torch.Tensor  # (N,) raw node influence on the logits (unpruned graph)
    cumulative: torch.Tensor  # (N,) cumulative influence share at each node's rank (what circuit-tracer exports)


def prune(g: Graph, node_threshold: float = CIRCUIT.node_threshold, edge_threshold: float = CIRCUIT.edge_threshold) -> Pruned:
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{name} {v}; valid: 0 to 1 (the share of cumulative influence kept)")
    A, w = g.adjacency, g.logit_weights()
    n_fixed = g.n_pos + len(g.logit_tokens)  # tokens and logits, at the end
    nf = g.n_features
    infl = influence(normalize(A), w)
    node_mask = infl >= find_threshold(infl, node_threshold)
    node_mask[-n_fixed:] = True
    P = A.clone()
    P[~node_mask] = 0
    P[:, ~node_mask] = 0
    Pn = normalize(P)
    edge_scores = Pn * (influence(Pn, w) + w)[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores, edge_threshold)
    while True:
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)  # feature and error nodes need an outgoing edge
        node_mask[:nf] &= edge_mask[:nf].any(1)  # feature nodes need an incoming edge
        if torch.equal(node_mask, old):
            break
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False
    sv, si = torch.sort(infl, descending=True)
    cum = torch.zeros_like(infl)
    cum[si] = torch.cumsum(sv, 0) / sv.sum().clamp(min=1e-30)
    return Pruned(node_mask, edge_mask, infl, cum)


def graph_scores(g: Graph) -> tuple[float, float]:
    """(replacement score, completeness score)."""
    An, w = normalize(g.adjacency), g.logit_weights()
    infl = influence(An, w)
    err = slice(g.error_start, g.token_start)
    token_infl = infl[g.token_start:g.logit_start].sum()
    error_infl = infl[err].sum()
    replacement = token_infl / (token_infl + error_infl).clamp(min=1e-30)
    non_error = 1 - An[:, err].sum(dim=-1)
    out = infl + w
    completeness = (non_error * out).sum() / out.sum()
    return float(replacement), float(completeness)
