"""One call for a whole graph: build, prune, score, check against the real model, export."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import CIRCUIT, CircuitConfig
from ..models import HookedLM
from .export import graph_to_json
from .graph import Graph, build_graph, prompt_ids
from .prune import Pruned, graph_scores, prune
from .residual import ResidualSAESet, build_residual_graph, verify_residual
from .transcoders import TranscoderSet
from .verify import EdgeCheck, NodeCheck, verify


@dataclass
class CircuitResult:
    graph: Graph
    pruned: Pruned
    scores: tuple[float, float]  # replacement, completeness
    node_checks: list[NodeCheck]
    edge_checks: list[EdgeCheck]

    def to_json(self, **kw) -> dict:
        return graph_to_json(self.graph, self.pruned, self.scores, **kw)


def circuit(lm: HookedLM, tset: TranscoderSet | ResidualSAESet, prompt: str | list[int], target: str | int | None = None,
            cfg: CircuitConfig = CIRCUIT, node_threshold: float | None = None, edge_threshold: float | None = None,
            check: bool = True) -> CircuitResult:
    cfg = replace(cfg, node_threshold=cfg.node_threshold if node_threshold is None else node_threshold,
                  edge_threshold=cfg.edge_threshold if edge_threshold is None else edge_threshold)
    if isinstance(prompt, str):
        ids, text = prompt_ids(lm, prompt), prompt
    else:
        ids, text = list(prompt), None
    residual = isinstance(tset, ResidualSAESet)  # residual-stream SAEs: residual.py's linearised graph
    g = (build_residual_graph if residual else build_graph)(lm, tset, ids, text, target, cfg)
    p = prune(g, cfg.node_threshold, cfg.edge_threshold)
    scores = graph_scores(g)
    nodes, edges = (verify_residual if residual else verify)(lm, tset, g, p, cfg) if check else ([], [])
    return CircuitResult(g, p, scores, nodes, edges)
