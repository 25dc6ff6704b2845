"""One call for a whole graph: build, prune, score, check against the real model, export."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import CIRCUIT, CircuitConfig
from ..models import HookedLM
from .export import graph_to_json
from .graph import Graph, build_graph, prompt_ids
from .prune import Pruned, graph_scores, prune
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


def circuit(lm: HookedLM, tset: TranscoderSet, prompt: str | list[int], target: str | int | None = None,
            cfg: CircuitConfig = CIRCUIT, node_threshold: float | None = None, edge_threshold: float | None = None,
            check: bool = True) -> CircuitResult:
    if isinstance(prompt, str):
        ids, text = prompt_ids(lm, prompt), prompt
    else:
        ids, text = list(prompt), None
    g = build_graph(lm, tset, ids, text, target, cfg)
    return from_graph(lm, tset, g, cfg, node_threshold, edge_threshold, check)


def from_graph(lm: HookedLM, tset: TranscoderSet, g: Graph, cfg: CircuitConfig = CIRCUIT,
               node_threshold: float | None = None, edge_threshold: float | None = None,
               check: bool = True, memo: dict | None = None) -> CircuitResult:
    """Prune, score and check an already built (unpruned) graph: what the worker's graph cache re-runs when only
    the thresholds change (`memo`, kept with the graph, spares the real-model runs of nodes checked before)."""
    cfg = replace(cfg, node_threshold=cfg.node_threshold if node_threshold is None else node_threshold,
                  edge_threshold=cfg.edge_threshold if edge_threshold is None else edge_threshold)
    p = prune(g, cfg.node_threshold, cfg.edge_threshold)
    scores = graph_scores(g)
    nodes, edges = verify(lm, tset, g, p, cfg, memo=memo) if check else ([], [])
    return CircuitResult(g, p, scores, nodes, edges)
