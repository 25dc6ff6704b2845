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
    if isinstance(prompt, str):
        ids, text = prompt_ids(lm, prompt), prompt
    else:
        ids, text = list(prompt), None
    g = build_any(lm, tset, ids, text, target, cfg)
    return from_graph(lm, tset, g, cfg, node_threshold, edge_threshold, check)


def build_any(lm: HookedLM, tset: TranscoderSet | ResidualSAESet, ids: list[int], text: str | None = None,
              target: str | int | None = None, cfg: CircuitConfig = CIRCUIT) -> Graph:
    """The unpruned graph on transcoders (graph.py) or on residual-stream SAEs (residual.py's linearised graph)."""
    build = build_residual_graph if isinstance(tset, ResidualSAESet) else build_graph
    return build(lm, tset, ids, text, target, cfg)


def from_graph(lm: HookedLM, tset: TranscoderSet | ResidualSAESet, g: Graph, cfg: CircuitConfig = CIRCUIT,
               node_threshold: float | None = None, edge_threshold: float | None = None,
               check: bool = True, memo: dict | None = None) -> CircuitResult:
    """Prune, score and check an already built (unpruned) graph: what the worker's graph cache re-runs when only
    the thresholds change (`memo`, kept with the graph, spares the real-model runs of nodes checked before;
    transcoder graphs only)."""
    cfg = replace(cfg, node_threshold=cfg.node_threshold if node_threshold is None else node_threshold,
                  edge_threshold=cfg.edge_threshold if edge_threshold is None else edge_threshold)
    p = prune(g, cfg.node_threshold, cfg.edge_threshold)
    scores = graph_scores(g)
    if not check:
        nodes, edges = [], []
    elif isinstance(tset, ResidualSAESet):
        nodes, edges = verify_residual(lm, tset, g, p, cfg)
    else:
        nodes, edges = verify(lm, tset, g, p, cfg, memo=memo)
    return CircuitResult(g, p, scores, nodes, edges)
