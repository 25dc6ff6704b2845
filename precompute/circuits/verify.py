"""Checked, not just drawn: the graph's claims next to real interventions on the real model (nothing frozen).

Node check (features and error nodes with the highest influence): ablate the node in the real model -- subtract
its contribution (a_s d_s at every layer it writes to; an error node: its error vector) from the MLP output at
its position -- run the whole model again (real attention, real MLPs) and measure the change of the target
logit, demeaned over the vocabulary as the graph's logit node is. The graph's estimate is the linear total effect
through the graph: -(A[logit, s] + Σ_t J_t A[t, s]) with J the total derivative of the logit node with respect
to each feature's activation (J = r (I - M)^{-1}, M[t, u] = A[t, u] / a_u, r = A[logit, features] / a).

Edge check (the strongest feature -> feature edges): ablate the source in the real model and measure the
change of the target feature's activation; the estimate is the graph's total linear effect on the target's
pre-activation (the direct edge weight -A[t, s] plus paths through intermediate features).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import CIRCUIT, CircuitConfig
from ..models import HookedLM, hook_site
from .graph import Graph
from .prune import Pruned
from .transcoders import TranscoderSet


@dataclass
class NodeCheck:
    node: int
    estimate: float  # graph's predicted change of the demeaned target logit when the node is ablated
    true: float  # measured in the real model
    agree: bool


@dataclass
class EdgeCheck:
    source: int
    target: int
    weight: float  # the edge A[t, s]
    estimate: float  # graph's predicted change of the target's activation (total linear effect)
    true: float  # measured in the real model
    agree: bool


def agrees(estimate: float, true: float, cfg: CircuitConfig = CIRCUIT) -> bool:
    diff = abs(true - estimate)
    return diff <= max(cfg.verify_atol, cfg.verify_rtol * abs(estimate))


def _per_unit(g: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """M (features x features) = A / a_source, and the activations a."""
    nf = g.n_features
    a = g.activations.to(g.adjacency.dtype)
    M = g.adjacency[:nf, :nf] / a.clamp(min=1e-30)[None, :]
    return M, a


def total_effects(g: Graph, row: torch.Tensor) -> torch.Tensor:
    """For a target row r of A (its direct edges), the graph's total linear effect of every source column on it:
    r_s + Σ_t J_t A[t, s], J = (r[features] / a) (I - M)^{-1}."""
    nf = g.n_features
    M, a = _per_unit(g)
    r_unit = row[:nf] / a.clamp(min=1e-30)
    I = torch.eye(nf, dtype=M.dtype)
    J = torch.linalg.solve((I - M).T, r_unit) if nf else r_unit  # J (I - M) = r_unit, J = total d(target)/d a
    return row + J @ g.adjacency[:nf]


def _deltas(g: Graph, tset: TranscoderSet, node: int) -> dict[int, tuple[int, torch.Tensor]]:
    """layer -> (position, vector to subtract from that MLP output) for ablating `node`."""
    info = g.node(node)
    if info["kind"] == "feature":
        enc = tset.encoders[info["layer"]]
        return {o: (info["pos"], info["activation"] * enc.W_dec[info["feature"], o - info["layer"]])
                for o in enc.out_layers}
    if info["kind"] == "error":
        return {info["layer"]: (info["pos"], g.errors[info["layer"], info["pos"]])}
    raise ValueError(f"node {node} is a {info['kind']} node; only features and errors are ablated")


@contextmanager
def ablated(lm: HookedLM, sub: dict[int, tuple[int, torch.Tensor]], capture: dict | None = None,
            input_kind: str = "hook_mlp_in") -> Iterator[None]:
    """Real-model forward passes with vectors subtracted from MLP outputs; optionally capture transcoder inputs."""
    handles = []
    for l, (p, v) in sub.items():
        mod, _ = hook_site(lm.layers[l], "hook_mlp_out", lm.model_type)

        def hook(_m, _a, out, p=p, v=v):
            o = out[0] if isinstance(out, tuple) else out
            o = o.clone()
            o[:, p] -= v.to(device=o.device, dtype=o.dtype)
            return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
        handles.append(mod.register_forward_hook(hook))
    if capture is not None:
        for l in range(lm.n_layers):
            mod, _ = hook_site(lm.layers[l], input_kind, lm.model_type)

            def pre(_m, args, kwargs, l=l):
                capture[l] = (args[0] if args else kwargs["hidden_states"])[0].detach()
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _run(lm: HookedLM, ids: list[int]) -> torch.Tensor:
    return lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False).logits[0, -1].double()


def _demeaned(logits: torch.Tensor, token: int) -> float:
    return float(logits[token] - logits.mean())


def verify(lm: HookedLM, tset: TranscoderSet, g: Graph, pruned: Pruned, cfg: CircuitConfig = CIRCUIT, logit: int = 0,
           kinds: tuple[str, ...] = ("feature", "error"), memo: dict | None = None) -> tuple[list[NodeCheck], list[EdgeCheck]]:
    """Check the top nodes and edges of `g` (ranked on the pruned graph) against real ablations.

    `memo` (a dict kept with the graph) remembers each real-model run by what it ablated: another pruning of the
    same graph checks mostly the same nodes, and those runs are not repeated."""
    memo = {} if memo is None else memo

    def once(key, fn):
        if key not in memo:
            memo[key] = fn()
        return memo[key]
    tset = tset.to(lm.dtype, lm.device)
    token = g.logit_tokens[logit]
    base = once(("base", token), lambda: _demeaned(_run(lm, g.tokens), token))
    est_all = -total_effects(g, g.adjacency[g.logit_start + logit])
    start = 0 if "feature" in kinds else g.error_start
    stop = g.token_start if "error" in kinds else g.error_start
    cand = [i for i in range(start, stop) if pruned.node_mask[i]]
    cand.sort(key=lambda i: -float(pruned.influence[i]))
    nodes = []

    def node_run(i):
        with ablated(lm, _deltas(g, tset, i)):
            return _demeaned(_run(lm, g.tokens), token) - base
    for i in cand[: cfg.verify_nodes]:
        true = once(("node", token, i), lambda: node_run(i))
        est = float(est_all[i])
        nodes.append(NodeCheck(i, est, true, agrees(est, true, cfg)))
    nf = g.n_features
    E = pruned.edge_mask[:nf, :nf] & (g.adjacency[:nf, :nf] != 0)
    pairs = E.nonzero().tolist()
    pairs.sort(key=lambda ts: -abs(float(g.adjacency[ts[0], ts[1]])))

    def inputs(sub):
        cap: dict = {}
        with ablated(lm, sub, cap, tset.input_kind):
            _run(lm, g.tokens)
        return cap
    base_in = once(("inputs", None), lambda: inputs({}))
    edges = []
    for t, s in pairs[: cfg.verify_edges]:
        tl, tp, tf = (int(v) for v in g.features[t])
        enc = tset.encoders[tl]
        before = float(enc.encode(base_in[tl])[tp, tf])
        after = once(("edge", s, t), lambda: float(enc.encode(inputs(_deltas(g, tset, s))[tl])[tp, tf]))
        est = float(-total_effects(g, g.adjacency[t])[s])
        edges.append(EdgeCheck(s, t, float(g.adjacency[t, s]), est, after - before, agrees(est, after - before, cfg)))
    return nodes, edges
